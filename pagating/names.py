"""Every metric, tag and artifact name that more than one module uses, spelled once.

The lowest floor of the package: it imports nothing, so any module may use it. A name used by one module
only stays in that module. Metric names follow DESIGN.md ("MLflow conventions"); MLflow's own tag names
(`mlflow.*`) are MLflow's, listed here only where our code writes or reads them in several places.
"""

# Metrics (step = optimizer step)
TRAIN_LOSS = "train/loss"
EVAL_LOSS = "eval/loss"
EVAL_PPL = "eval/ppl"
TEST_LOSS = "test/loss"
TEST_PPL = "test/ppl"
BEST_EVAL_LOSS = "best/eval_loss"
FINAL_EVAL_LOSS = "final/eval_loss"
FINAL_EVAL_PPL = "final/eval_ppl"
STEP_TIME = "perf/step_time_s"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
COST_USD = "cost/usd"

# Params that are not config keys
GPU_NAME = "gpu.name"
USD_PER_HOUR = "cost.usd_per_hour"
ALPHA_KIND = "alpha.kind"

# Our tags
CONFIG_HASH = "pagating.config_hash"   # a run's identity: skip / resume / claim
SWEEP_ID = "pagating.sweep_id"
ROLE = "pagating.role"                 # "sweep" on a sweep's parent run
ROLE_SWEEP = "sweep"
GRID_HASHES = "pagating.grid_hashes"   # on the parent: the config hashes of the whole grid, comma-separated
BEST_CONFIG = "pagating.best_config"
BEST_RUN_ID = "pagating.best_run_id"
ERROR = "pagating.error"               # why a run FAILED, one secret-free line
HEARTBEAT = "pagating.heartbeat"
STATUS_REASON = "pagating.status_reason"  # why a sweep's parent run is FAILED (or still RUNNING)
INSTANCE_TAG = "pagating.instance."    # + instance id; value "<state>: <detail>"
SHARD_TAG = "pagating.shard."          # + shard index: the shard's latest instance (JSON, secrets left out)
RELAUNCHES_TAG = "pagating.relaunches."  # + shard index: how often watch re-ran the shard

# MLflow's own tags that several modules write or read
NOTE = "mlflow.note.content"
RUN_NAME = "mlflow.runName"
PARENT_RUN_ID = "mlflow.parentRunId"

# Artifacts
LOG_ARTIFACT_DIR = "logs"              # on a sweep's parent: logs/instance-<id>.log, logs/<job>.log
MODEL_ARTIFACT = "model"

# The report's files (written by `pagating report`, named by `pagating sweep` and dvc.yaml)
REPORTS_DIR = "reports"
SWEEP_JSON = f"{REPORTS_DIR}/sweep.json"
SUMMARY = "summary.md"
METRICS = "metrics.json"
PLOTS = "plots"
