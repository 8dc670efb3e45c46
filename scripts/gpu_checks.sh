#!/usr/bin/env bash
# The speed checks that need a GPU, in one run (estimated at ~8 minutes on an H200; not yet run on one):
#   * scripts/bench_pack.py: 16 batch-1 jobs (TI and hypernetworks) packed against one after another,
#     SD-1.5 shapes, bf16 (target: >= 8x), with the time by kind of operator;
#   * scripts/bench_step.py: conceptlab's TI and hypernetwork steps against the diffusers example's,
#     SD-1.5 shapes, bf16 at batch 1, 4 and 16 (targets: batch 4 >= 4x the example, hypernetwork step
#     <= 1.15x TI's, peak memory <= the example's, batch 16 >= 40% of the bf16 peak), then compiled
#     (`trainer.compile=reduce-overhead`: CUDA graphs; target: batch 1 >= 3x), then fp16 at batch 4;
#   * scripts/bench_step.py --shape sdxl: SDXL base's shapes (random weights) at 1024 px, TI and LoRA at
#     batch 1 with gradient checkpointing, bf16 (target: peak memory <= 24 GB each), FLOPs counted.
# Each check writes its JSON (and its stderr) under $OUT (default: gpu-results/) as soon as it ends, so a
# run cut short still leaves what finished.
#
#   bash scripts/gpu_checks.sh --wheels   # here, once: what a bare GPU machine lacks, as wheels in .whl/
#   bash scripts/gpu_checks.sh            # there, with .whl/ copied beside it (allow 10 minutes)
#   SHAPE=tiny DEVICE=cpu DTYPE=float32 COMPILE=default STEPS=6 bash scripts/gpu_checks.sh   # a dry run on the CPU
# (COMPILE= empty leaves the compiled check out; JOBS sets the pack's jobs, 16; ROUNDS the timed rounds, 3.)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
    # The packages conceptlab's benchmarks import that a GPU image with PyTorch, transformers, Lightning,
    # peft and safetensors lacks, at the versions this checkout's environment has; pure-Python ones
    # without a wheel on the index are built here. For Python 3.12 on x86-64 Linux.
    set -e
    mkdir -p .whl
    version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "diffusers==$(version diffusers)" "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" \
        "importlib_metadata==$(version importlib_metadata)" "zipp==$(version zipp)" \
        "ftfy==$(version ftfy)" "wcwidth==$(version wcwidth)"
    python -m pip wheel -q --no-deps --no-build-isolation -w .whl \
        "antlr4-python3-runtime==$(version antlr4-python3-runtime)" "openai-clip==$(version openai-clip)"
    ls .whl
    exit 0
fi

OUT=${OUT:-gpu-results}
SHAPE=${SHAPE:-sd15}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
COMPILE=${COMPILE-reduce-overhead}
STEPS=${STEPS:-30}
ROUNDS=${ROUNDS:-3}
JOBS=${JOBS:-16}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ] && ! $PY -c "import diffusers, hydra, omegaconf, importlib.metadata as m; m.distribution('openai-clip')" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
KEEP=$(mktemp -d)
trap 'rm -rf "$KEEP"' EXIT
FOLDER=$KEEP/sd15  # the SD-1.5-shaped folder (random weights): made by the first check, reused
XL_SHAPE=$([ "$SHAPE" = tiny ] && echo tiny_xl || echo sdxl)  # the dry run's SDXL is the tests' tiny one

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>&1
fi
$PY -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    >"$OUT/versions.txt" 2>&1

failed=0
check() {  # check NAME ARGS...: one benchmark, its JSON in $OUT/NAME.json, its stderr in $OUT/NAME.err
    local name=$1
    shift
    local started=$SECONDS
    if "$PY" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; then
        echo "$name: done in $((SECONDS - started)) s"
    else
        echo "$name: FAILED after $((SECONDS - started)) s (see $name.err)"
        tail -5 "$OUT/$name.err"
        failed=1
    fi
}

check bench_pack scripts/bench_pack.py --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --jobs "$JOBS" --batch 1 \
    --methods ti,hypernet --profile --folder "$FOLDER"
check bench_step scripts/bench_step.py --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch-size 1,4,16 \
    --steps "$STEPS" --rounds "$ROUNDS" --folder "$FOLDER"
if [ -n "$COMPILE" ]; then
    check bench_step_compiled scripts/bench_step.py --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
        --batch-size 1,16 --compile "$COMPILE" --steps "$STEPS" --rounds "$ROUNDS" --folder "$FOLDER"
fi
check bench_step_fp16 scripts/bench_step.py --shape "$SHAPE" --device "$DEVICE" --dtype float16 --batch-size 4 \
    --steps "$STEPS" --rounds "$ROUNDS" --folder "$FOLDER"
check bench_step_sdxl scripts/bench_step.py --shape "$XL_SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch-size 1 \
    --methods ti,lora --gradient-checkpointing --steps "$STEPS" --rounds "$ROUNDS" --folder "$KEEP/sdxl"
exit $failed
