"""One training run: the HF Trainer on packed blocks, one MLflow run, checkpoints, resume.

`train()` reads top to bottom: check the input, claim the config and find what to resume, build the
model, open (or continue) the MLflow run, build the Trainer, fit, save `model/`; leaving the `with`
block closes the run. The run's bookkeeping (claim, spool, uploads, sampler, drain) is pagating.run's.
Everything a user can get wrong is checked before the MLflow run exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagating import flops, names, runtime
from pagating.config import PLAIN, UserError, add_config_args, config_from_args, flatten, is_plain, view
from pagating.data.dataset import check_prepared, load_tokenizer
from pagating.gpu import gpu_name
from pagating.identity import RunIdentity
from pagating.run import CHECKPOINT_BYTES_PER_PARAM, Job, TrainingRun, find_resume, finished_run
from pagating.tracking import store

runtime.passive_openmp()  # before transformers pulls in torch: OpenMP reads its wait policy once, at load

_POSITIVE = ("learning_rate", "batch_size", "max_steps", "eval_steps", "save_steps", "logging_steps")


def validate(cfg: dict, world: int = 1) -> None:
    """Every check of a run's settings beyond their declared types (load_config checked those); `world` is
    the number of training processes."""
    # heavy: alpha and units load torch, which must come after passive_openmp (and `pagating --help` skips it)
    from pagating.alpha import parse_alpha_mode
    from pagating.units import check_unit

    c = view(cfg)
    t, m = c.train, c.model
    try:
        parse_alpha_mode(t.alpha_mode)
        check_unit(m.unit)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for key in _POSITIVE:
        if getattr(t, key) <= 0:
            raise UserError(f"train.{key} must be a number > 0, got {getattr(t, key)!r}")
    if t.batch_size % world:
        raise UserError(f"train.batch_size {t.batch_size} is the global batch: it must divide by {world} processes")
    if m.init != "scratch" and m.param_matched and not is_plain(m.unit):
        raise UserError(f"model.init {m.init} copies the checkpoint's MLP into the value path, which needs "
                        "d_ff = ffn_dim: add --set model.param_matched=false (the gated arm then has more "
                        "parameters than plain)")


def pick_device(requested: str = "auto") -> str:
    import torch  # heavy: ~1 s, only the path that trains needs it

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda asked but no CUDA GPU is visible; use --device auto or cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    ok, line = runtime.check_cuda()  # a rented GPU box (PAGATING_CUDA_GPUS) must not train on CPU
    if not ok:
        raise UserError(line)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"  # the seed's Mac
    return "cpu"


def eval_indices(n_blocks: int, max_blocks: int = 0) -> list[int]:
    """The eval blocks of a split: all of them, or `max_blocks` spread over the whole split (the middle
    block of each of `max_blocks` equal stretches), the same set every time, so α-to-α differences are
    measured on the split rather than on its first pages."""
    if max_blocks <= 0 or max_blocks >= n_blocks:
        return list(range(n_blocks))
    return [(2 * i + 1) * n_blocks // (2 * max_blocks) for i in range(max_blocks)]


def train(cfg: dict, *, resume: str = "none", device: str = "auto", compile_model: str = "auto",
          parent_run_id: str | None = None, sweep_id: str | None = None,
          extra_tags: dict[str, str] | None = None, precision: str = "auto",
          threads: int | None = None, if_claimed: str = "exit") -> dict[str, Any]:
    """Run one config; returns {"run_id", "status", "run_dir", "final_eval_loss", ...}.

    if_claimed: what to do when a live process already trains this config: "exit" (UserError,
    exit 2) or "skip" (status "claimed", for the sweep, which comes back to it later).
    parent_run_id: the sweep's parent run (`--parent-run-id`); without it, the run `mlflow run` opened, if any."""
    job, identity = check(cfg, device=device, precision=precision, threads=threads, parent_run_id=parent_run_id)
    with TrainingRun(job, name=identity.run_name, resume=resume, if_claimed=if_claimed, sweep_id=sweep_id,
                     extra_tags=extra_tags) as run:  # claims the config, finds what to resume
        if run.outcome is not None:  # FINISHED already, trained elsewhere right now, or only uploads were left
            return run.outcome
        net = build(job, compile_model)
        run.open(params=run_params(job, net), n_params=net.n_params, gpu=net.gpu, usd_per_hour=net.usd_per_hour)
        trainer = make_trainer(job, net, run)
        test = fit(trainer, run.ckpt, cfg)
        save(trainer, test, run)
    return run.result  # finished on leaving the block: final uploads drained, status set, claim released


def launcher_parent(mlf, exp_id: str) -> str | None:
    """The run `mlflow run` opened for this process (MLflow's MLFLOW_RUN_ID), when it can be the parent: it is
    in the profile's experiment, so the UI nests them; one put elsewhere (Default) only points to the runs
    (store.adopt_launcher). The one reader of MLFLOW_RUN_ID (train and sweep); below a verb the parent
    travels as an argument."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    return launcher if launcher and store.adopt_launcher(mlf, launcher, exp_id) else None


def check(cfg: dict, *, device: str, precision: str, threads: int | None,
          parent_run_id: str | None) -> tuple[Job, RunIdentity]:
    """1. Every input check, before anything is written; the settings resolved (device, precision,
    threads) and where the run goes (server, experiment, parent)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    meta = check_prepared(cfg)  # made from this config, else exit 2 naming the fix
    uri = store.tracking_uri(cfg)
    store.check_server(uri)
    identity = RunIdentity.of(cfg, meta)
    check_output_dir(identity.run_dir, identity.output_dir)
    device = pick_device(device)
    precision = runtime.resolve_precision(precision, device)
    n_threads = runtime.set_threads(threads)
    mlf = store.client(uri)
    if parent_run_id:
        exp_id = mlf.get_run(parent_run_id).info.experiment_id
    else:
        exp_id = store.experiment_id(mlf, cfg)
        parent_run_id = launcher_parent(mlf, exp_id)
        if parent_run_id and rank == 0:
            mlf.set_tag(parent_run_id, names.RUN_NAME, f"mlflow run: {identity.run_name}")
    job = Job(cfg=cfg, rank=rank, world=world, meta=meta, uri=uri, h=identity.config_hash, run_dir=identity.run_dir,
              device=device, precision=precision, n_threads=n_threads, mlf=mlf, exp_id=exp_id,
              parent_run_id=parent_run_id)
    return job, identity


@dataclass
class Net:
    """The model built for a run and the numbers that describe it."""

    model: Any
    config: Any  # the model's PaGatingGPT2Config
    spec: Any  # the parsed α mode
    n_params: int
    vocab: int
    eval_pick: list[int]  # the validation blocks of the intermediate evals (the final eval takes all)
    compile_on: bool
    gpu: str  # NVML's name of the GPU, else the device
    usd_per_hour: float | None


def build(job: Job, compile_model: str) -> Net:
    """2. The model (deterministic for a seed) and its numbers; refuses a disk too small for the run."""
    from transformers import set_seed  # heavy: transformers and torch, only the path that trains needs them

    from pagating.alpha import parse_alpha_mode  # heavy: the model's modules load torch
    from pagating.model import build_config, build_model, count_parameters

    t, meta = view(job.cfg).train, job.meta
    set_seed(t.seed)
    vocab = flops.padded_vocab(meta["vocab_size"])  # tensor-core friendly vocabulary (pad rows unused)
    config = build_config(job.cfg["model"], vocab_size=vocab, block_size=meta["block_size"],
                          alpha_mode=t.alpha_mode, max_steps=t.max_steps, eos_token_id=meta.get("eos_id"),
                          bos_token_id=meta.get("eos_id"))
    model = build_model(config, init=job.cfg["model"]["init"])
    net = Net(model=model, config=config, spec=parse_alpha_mode(t.alpha_mode), n_params=count_parameters(model),
              vocab=vocab, eval_pick=eval_indices(meta["splits"]["validation"]["blocks"],
                                                  t.max_eval_batches * t.batch_size),
              compile_on=compile_model == "on" or (compile_model == "auto" and job.device == "cuda"),
              gpu=gpu_name() if job.device == "cuda" else job.device,
              usd_per_hour=float(os.environ["PAGATING_USD_PER_HOUR"]) if os.environ.get("PAGATING_USD_PER_HOUR")
              else None)
    if job.rank == 0:
        check_disk(job.run_dir, net.n_params)
    return net


def run_params(job: Job, net: Net) -> dict[str, Any]:
    """Every effective value, once, as the MLflow run's params."""
    cfg, meta, config, spec = job.cfg, job.meta, net.config, net.spec
    params = flatten(cfg)
    val_blocks = meta["splits"]["validation"]["blocks"]
    # eval.blocks/eval.tokens: the final eval (the whole split); eval.subset_blocks: each intermediate eval.
    params.update({"eval.blocks": val_blocks, "eval.tokens": val_blocks * meta["block_size"],
                   "eval.subset_blocks": len(net.eval_pick),
                   "test.tokens": meta["splits"]["test"]["tokens_packed"], "train.precision": job.precision,
                   "train.compile": "on" if net.compile_on else "off", "train.threads": job.n_threads})
    params.update({"model.d_ff": config.d_ff, "model.n_params": net.n_params, "model.vocab_size": net.vocab,
                   "train.device": job.device, "train.world_size": job.world,
                   **({names.ALPHA_KIND: "none (plain GPT-2 MLP)"} if config.plain else spec.params())})
    return params


def make_trainer(job: Job, net: Net, run: TrainingRun):
    """4. Data and the Trainer, its callbacks feeding the run (rank 0)."""
    import torch  # heavy: torch and transformers, only the path that trains needs them
    from transformers import default_data_collator

    from pagating import trainer as hf  # heavy: imports transformers at load
    from pagating.data.dataset import PackedDataset  # heavy: its first use imports torch

    cfg, meta, config = job.cfg, job.meta, net.config
    cuda = job.device == "cuda"
    run.compile_watch = runtime.CompileWatch() if net.compile_on else None
    tracked = run.callbacks(
        tokens_per_step=view(cfg).train.batch_size * meta["block_size"],
        flops_token=flops.flops_per_token(n_layer=config.n_layer, n_embd=config.n_embd, d_ff=config.d_ff,
                                          vocab_size=net.vocab, block_size=meta["block_size"], gated=not config.plain),
        # The one peak table, by the NVML name; a GPU it lacks gets no MFU rather than a wrong one. Tokens per
        # step are the global batch, so the peak is that of all the run's devices: MFU per device.
        peak=flops.run_peak_flops(net.gpu, job.world) if cuda or os.environ.get("PAGATING_PEAK_TFLOPS") else None,
        usd_per_hour=net.usd_per_hour, model=net.model, log_alpha=net.spec.logged,
        cuda=cuda)
    train_ds = PackedDataset(cfg["data"]["prepared_dir"], "train")
    validation = PackedDataset(cfg["data"]["prepared_dir"], "validation")
    eval_ds = validation if len(net.eval_pick) >= len(validation) else torch.utils.data.Subset(validation,
                                                                                             net.eval_pick)
    tokenizer = load_tokenizer(cfg["data"]["prepared_dir"])
    args = hf.training_arguments(cfg, job.run_dir, job.device, net.compile_on, job.world,
                                 bf16=job.precision == "bf16")
    trainer = hf.PaGatingTrainer(model=net.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tokenizer,
                                 data_collator=default_data_collator,  # blocks are packed: never pad
                                 callbacks=[hf.AlphaCallback(net.model), *tracked])
    trainer.final_eval_dataset = validation
    if run.tracks:
        trainer.on_optimizer = lambda groups: run.log_text(json.dumps(groups, indent=1), "optimizer_groups.json")
        run.result["resumed_from"] = str(run.ckpt) if run.ckpt else None
        print(f"pagating: {run.name} -> run {run.run_id} ({'resumed from ' + str(run.ckpt) if run.ckpt else 'new'}),"
              f" {net.n_params:,} params, {job.device}, output {job.run_dir}\n"
              f"pagating: run page {store.run_url(job.uri, job.exp_id, run.run_id)}", file=sys.stderr)
    return trainer


def fit(trainer, ckpt: Path | None, cfg: dict) -> dict[str, float]:
    """5. Train (the Trainer restores optimizer, LR schedule, RNG and data order on resume), then the
    test split, once, on the final weights. The Trainer itself evaluates at the last step; a checkpoint
    of the last step trains nothing more."""
    if ckpt is not None and _checkpoint_global_step(ckpt) >= view(cfg).train.max_steps:
        from transformers import TrainerState  # heavy: transformers; only a resume at the last step needs it

        trainer._load_from_checkpoint(str(ckpt))
        trainer.state = TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        if not any("eval_loss" in e and e.get("step") == trainer.state.global_step for e in trainer.state.log_history):
            trainer.evaluate()  # max_steps not a multiple of eval_steps: the final eval still happens, whole split
    from pagating.data.dataset import PackedDataset  # heavy: its first use imports torch

    return trainer.evaluate(PackedDataset(cfg["data"]["prepared_dir"], "test"), metric_key_prefix="test")


def save(trainer, test: dict[str, float], run: TrainingRun) -> None:
    """6. Summary metrics and the final model (uploaded when the run closes, with the server's time)."""
    if not run.tracks:
        return
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    final = evals[-1]
    run.spool.log({names.BEST_EVAL_LOSS: min(evals), names.FINAL_EVAL_LOSS: final,
                   names.FINAL_EVAL_PPL: math.exp(min(final, 50.0)), names.TEST_LOSS: test["test_loss"],
                   names.TEST_PPL: math.exp(min(test["test_loss"], 50.0))}, trainer.state.global_step)
    run.model_dir = run.run_dir / "model"
    trainer.save_model(str(run.model_dir))
    run.model_step = trainer.state.global_step
    run.result.update(final_eval_loss=final, best_eval_loss=min(evals), first_eval_loss=evals[0],
                      test_loss=test["test_loss"])


def _existing(path: Path) -> Path:
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def check_output_dir(run_dir: Path, output_dir: str) -> None:
    """The run's folder can be made and written: checked before the claim and the MLflow run exist."""
    where = _existing(run_dir)
    fix = "set train.output_dir (--output_dir) to a folder"
    if not where.is_dir():
        raise UserError(f"train.output_dir {output_dir}: {where} is a file, not a folder: remove it or {fix}")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir {output_dir}: cannot write in {where} (permissions): {fix} you can write")


def check_disk(run_dir: Path, n_params: int) -> None:
    """Refuse to start when the output folder's disk cannot hold one checkpoint (weights + Adam state);
    a disk that fills up later is one line then (pagating.disk.disk_full)."""
    where = _existing(run_dir)
    need, free = CHECKPOINT_BYTES_PER_PARAM * n_params + 2**20, shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"not enough disk space in {where}: one checkpoint of this model needs about "
                        f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free some or set train.output_dir "
                        f"elsewhere")


def _checkpoint_global_step(ckpt: Path) -> int:
    return int(json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("global_step", 0))


# CLI ------------------------------------------------------------------------------------------

def _opt(kind):
    """An argparse type where "" means "not given" (an empty MLproject parameter)."""
    def parse(text: str):
        return None if text == "" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_train_args(p: argparse.ArgumentParser) -> None:
    from pagating.alpha import choices as alpha_choices  # heavy: the registries' modules load torch
    from pagating.units import UNITS

    # --profile, --set and the seed's flags (--alpha_mode, --learning_rate, ...) come from pagating/config.py;
    # the α modes' and the units' help from their registries.
    add_config_args(p, "train", helps={"train.alpha_mode": alpha_choices(" | "),
                                       "model.unit": " | ".join([*UNITS, PLAIN])})
    p.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", help="a checkpoint folder")
    p.add_argument("--resume", default="none",
                   help="none | auto (local checkpoint, else MLflow; error if none) | if-any | a checkpoint path")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) for one run: torchrun + the Trainer's DDP; batch_size stays global")
    p.add_argument("--parent-run-id", help=argparse.SUPPRESS)  # the sweep's parent run: the one way it is passed
    p.add_argument("--sweep-id", help=argparse.SUPPRESS)
    p.add_argument("--if-claimed", default="exit", choices=["exit", "skip"], help=argparse.SUPPRESS)  # sweep: skip
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile (auto: on for CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on a CUDA GPU that has it)")
    p.add_argument("--threads", type=_opt(int),
                   help="torch CPU threads (default: OMP_NUM_THREADS, else this process's share of the cores, "
                        "no more than are idle at its start)")


def launch_ddp(args, cfg: dict, resume: str) -> int:
    """`--nproc N`: the same command under torchrun (the Trainer's DDP), one MLflow run from rank 0.

    Resume is resolved here, once, so N processes never download the same checkpoint at once.
    """
    validate(cfg, args.nproc)
    meta = check_prepared(cfg)  # made from this config, else exit 2 naming the fix
    uri = store.tracking_uri(cfg)
    store.check_server(uri)
    mlf = store.client(uri)
    identity = RunIdentity.of(cfg, meta)
    h = identity.config_hash
    exp_id = store.experiment_id(mlf, cfg)  # a new sqlite store is created here once, not by N ranks at once
    runs = store.runs_with_hash(mlf, exp_id, h)
    done = finished_run(runs, h)  # decided here: N processes must all train or none
    if done is not None:
        print(json.dumps(done | {"run_dir": str(identity.run_dir)}, default=str))
        return 0
    ckpt, _ = find_resume(cfg, resume, identity.run_dir, mlf, h, runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "pagating.cli", *_rank_argv(args.argv), "--resume", str(ckpt) if ckpt else "none"]
    env = dict(os.environ)
    if not runtime.explicit_threads():  # torchrun would set 1 per process; each process gets its share instead
        env["OMP_NUM_THREADS"] = env[runtime.SHARE_ENV] = str(runtime.thread_share(args.nproc))
    return subprocess.call(cmd, env=env)


def _rank_argv(argv: list[str]) -> list[str]:
    """The launcher's command without --nproc and --resume*: each rank gets the launcher's resolved resume."""
    argv = list(argv)
    cut = argv.index("--nproc")
    del argv[cut:cut + 2]
    for flag in ("--resume", "--resume_from_checkpoint", "--resume-from-checkpoint"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    return argv


def resume_arg(args) -> str:
    return args.resume_from_checkpoint or args.resume or "none"


def train_from_args(args, cfg: dict | None = None) -> dict[str, Any]:
    """`pagating train`'s arguments to one run (the CLI's and the sweep worker's door)."""
    cfg = config_from_args(args) if cfg is None else cfg
    return train(cfg, resume=resume_arg(args), device=args.device, compile_model=args.compile,
                 parent_run_id=args.parent_run_id, sweep_id=args.sweep_id, precision=args.precision,
                 threads=args.threads, if_claimed=args.if_claimed)


def exit_code(result: dict[str, Any]) -> int:
    """0 when the config is done or another process trains it (the sweep comes back to it), else 1."""
    return 0 if result["status"] in ("FINISHED", "claimed") else 1


def cli_train(args) -> int:
    cfg = config_from_args(args)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ddp(args, cfg, resume_arg(args))
    result = train_from_args(args, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, default=str))
    return exit_code(result)


def register_cli(sub) -> None:
    p = sub.add_parser("train", help="one tracked training run (HF Trainer + MLflow)")
    add_train_args(p)
    p.set_defaults(func=cli_train)
