#!/usr/bin/env bash
# One short check for an offline GPU machine (no internet; torch, transformers, tokenizers, nvidia-ml-py
# present; no mlflow, datasets or dvc). Prepare the kit here first (`make gpu-kit`: wheels of what the
# machine lacks + prepared sample data, in gpu-kit/, kept out of git), carry gpu-kit/ along, then from
# the repo root:
#
#     PYTHONPATH=. bash bench/gpu_check.sh
#
# Parts, each in its own process under `timeout`, a failure recorded and the next part run:
#   env           nvidia-smi, torch/CUDA versions, GPU name
#   nvml          pagating.gpu.GpuSampler readings around a ~3 s bf16 matmul load
#   accept_install  a venv (--system-site-packages) + the kit's wheels installed offline (pip --no-index)
#   accept_train  `pagating train` at the seed's shape (GPT-2 small paGLU, 16 x 128, bf16, compile on),
#                 300 steps into a local sqlite MLflow store, then what a user sees: FINISHED, step time,
#                 MFU, NVML metrics > 0, checkpoints/latest, the model loading back (bench/gpu_accept.py)
#   accept_nproc  `pagating train --nproc <GPUs present>` (tiny config)
#   accept_sweep  `pagating sweep --gpus all` with two tiny configs
#   seed          train_step.py at the seed config (GPT-2 small paGLU, 16 x 128, bf16), with plain GPT-2
#                 and the upstream structure beside it: s/step, MFU, the two ratios
#   units         units.py on CUDA (the seven units vs naive, fused vs unfused)
#   throughput    32 x 1024 under torch.compile (pagating): MFU
#   seed_compile  the seed config under torch.compile (pagating and plain); last, as it takes longest
# Writes one JSON of all figures to $OUT/gpu_check.json (else ./gpu_check.json), the parts' logs to
# $OUT/gpu_check_logs/ when $OUT is set, and prints the JSON as the last line. Whole run capped at
# GPU_CHECK_BUDGET_S (default 450 s) so it ends inside 8 minutes on a fresh machine.
#
# Knobs: GPU_CHECK_CPU=1 forces CPU and tiny sizes (to test this script without a GPU; the acceptance
# parts then install the wheels into a venv that holds only what the GPU machine has);
# GPU_CHECK_PARTS="seed units" runs a subset; GPU_CHECK_TIMEOUT_S caps every part; PYTHON picks
# the interpreter (default python3); GPU_KIT the kit folder (default gpu-kit).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-.}"
mkdir -p "$OUTDIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"  # shared by the compile parts
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
DEADLINE=$((SECONDS + BUDGET))
PARTS="${GPU_CHECK_PARTS:-env nvml accept_install accept_train accept_nproc accept_sweep seed units throughput seed_compile}"
KIT="${GPU_KIT:-$ROOT/gpu-kit}"

if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
    # Same logic, CPU and tiny sizes: one thread (steady on a shared machine), the tiny model for
    # the seed and throughput parts, no torch.compile (that is a CUDA-side check).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    DEV=(--device cpu)
    SEED=(--configs tiny --warmup 1 --steps 2)
    COMPILE=()
    THROUGHPUT=(--configs tiny --models pagating --batch-size 4 --block-size 128 --warmup 1 --steps 2)
    UNITS=(--quick --dim 128 --ffn 512)
    NVML_S=0.5
    ACCEPT=(--cpu)
    INSTALL=(--emulate)
else
    DEV=(--device cuda)
    SEED=(--configs gpt2-small --warmup 10 --steps 30)
    COMPILE=(--compile)
    THROUGHPUT=(--configs gpt2-small --models pagating --batch-size 32 --block-size 1024 --warmup 5 --steps 15)
    UNITS=()
    NVML_S=3
    ACCEPT=()
    INSTALL=()
fi

# part NAME TIMEOUT_S CMD...: run CMD under timeout; NAME.out/.err/.status land in $WORK.
part() {
    local name="$1" limit="$2"
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    [ -n "${GPU_CHECK_TIMEOUT_S:-}" ] && [ "$GPU_CHECK_TIMEOUT_S" -lt "$limit" ] && limit="$GPU_CHECK_TIMEOUT_S"
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "skipped: the ${BUDGET} s budget is spent" >"$WORK/$name.err"
        echo "125 0" >"$WORK/$name.status"
        echo "== $name: skipped (budget spent)"
        return 0
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    rc=$?
    echo "$rc $((SECONDS - t0))" >"$WORK/$name.status"
    # The part's table, without its JSON line (that goes into the merged JSON).
    grep -v '^{' "$WORK/$name.out" | sed 's/^/   /'
    if [ "$rc" -ne 0 ]; then
        echo "   !! $name failed (exit $rc); last lines of its stderr:"
        tail -n 5 "$WORK/$name.err" | sed 's/^/   !! /'
    fi
    return 0
}

if case " $PARTS " in *" env "*) true ;; *) false ;; esac; then
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi 2>&1 | sed 's/^/   /'
        nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm \
            --format=csv 2>&1 | sed 's/^/   /'
    else
        echo "   nvidia-smi not found"
    fi
fi
part env 60 "$PY" bench/_common.py env
part nvml 60 "$PY" bench/_common.py nvml --seconds "$NVML_S"
# The product's path: the kit's wheels into a venv, then the CLI as a user runs it (its python).
part accept_install 120 "$PY" bench/gpu_kit.py install "$KIT" "$WORK/box" "${INSTALL[@]}"
BOXPY="$WORK/box/bin/python"
[ -x "$BOXPY" ] || BOXPY="$PY"  # install not run: the interpreter must have the packages already
if [ -f "$WORK/accept_install.status" ] && [ "$(cut -d' ' -f1 "$WORK/accept_install.status")" != 0 ]; then
    # Without the kit's packages the CLI cannot run: record why instead of three failures that say less.
    for name in accept_train accept_nproc accept_sweep; do
        case " $PARTS " in *" $name "*) ;; *) continue ;; esac
        echo "skipped: accept_install failed (see its error)" >"$WORK/$name.err"
        echo "125 0" >"$WORK/$name.status"
    done
    PARTS=" $PARTS "
    for name in accept_train accept_nproc accept_sweep; do PARTS="${PARTS/ $name / }"; done
fi
part accept_train 240 "$BOXPY" bench/gpu_accept.py train --kit "$KIT" --work "$WORK/accept" "${ACCEPT[@]}"
part accept_nproc 120 "$BOXPY" bench/gpu_accept.py nproc --kit "$KIT" --work "$WORK/accept" "${ACCEPT[@]}"
part accept_sweep 180 "$BOXPY" bench/gpu_accept.py sweep --kit "$KIT" --work "$WORK/accept" "${ACCEPT[@]}"
part seed 150 "$PY" bench/train_step.py "${DEV[@]}" "${SEED[@]}"
part units 90 "$PY" bench/units.py "${DEV[@]}" "${UNITS[@]}"
part throughput 150 "$PY" bench/train_step.py "${DEV[@]}" "${THROUGHPUT[@]}" "${COMPILE[@]}"
part seed_compile 200 "$PY" bench/train_step.py "${DEV[@]}" "${SEED[@]}" --models pagating,plain "${COMPILE[@]}"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu_check_logs" && cp "$WORK"/*.out "$WORK"/*.err "$OUT/gpu_check_logs/" 2>/dev/null
    for log in "$WORK"/accept/*/cli.log; do  # the acceptance runs' own stderr
        [ -f "$log" ] && cp "$log" "$OUT/gpu_check_logs/accept_$(basename "$(dirname "$log")").cli.log"
    done
fi
echo "== done in $SECONDS s; figures in $OUTDIR/gpu_check.json"
"$PY" bench/_common.py merge "$WORK" "$OUTDIR/gpu_check.json"
