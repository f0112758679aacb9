#!/usr/bin/env bash
# Every GPU measurement of bench/gpu_11b.py in one call, within a time budget: build the random 11B model, QLoRA
# training at 2048 tokens x 2 rows with its memory trace, the same with PEFT's LoRA dropout instead of the lean one
# (what that saves on the GPU), stage beam search against greedy, then training with PyTorch's expandable segments.
# Each step prints one JSON line and keeps it in $OUT (or bench/out). The whole call keeps to BUDGET_S seconds
# (from the script's start): a step that would start later is skipped, and one running when it is up is stopped
# (timeout's status 124); the script exits 1 when a step did not finish well.
#
#   bash bench/gpu_session.sh                  # on a GPU machine, from the repository's root
#   ARCH=test SEQ=256 TRAIN_FLAGS="--max_image_tiles 2" bash bench/gpu_session.sh   # the tiny `test` model, a CPU
#
# Where trl, bitsandbytes or datasets are missing (no network there), carry them as wheels in .whl/ first; from
# the root of a machine with pip (cp312 here is the GPU machine's Python):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 \
#     multiprocess==0.70.19 transformers==5.24.0 peft==0.21.2
# (the versions the tests ran with; the GPU machine had transformers 5.17). These 7 wheels are 57 MB, within the
# 64 MiB a device call carries with the working tree.
set -uo pipefail

OUT=${OUT:-bench/out}
ARCH=${ARCH:-llama32v-11b}
SEQ=${SEQ:-2048}
BUDGET_S=${BUDGET_S:-480}
MODEL=${MODEL:-/tmp/m11}
read -r -a TRAIN_FLAGS <<<"${TRAIN_FLAGS:-}"  # more `stagereason train` flags for both training steps
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT/site" \
    .whl/*.whl || exit 1
  export PYTHONPATH="$OUT/site:$PYTHONPATH"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"

failed=0
step() {  # step NAME ARGS...: one bench call, its last line (the JSON) kept as $OUT/NAME.json
  local name=$1 left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc
  shift
  if ((left <= 0)); then
    echo "{\"step\": \"$name\", \"skipped\": \"past the ${BUDGET_S}s budget\"}" | tee "$OUT/$name.json"
    echo "# $name: skipped" >>"$OUT/steps.txt"
    failed=1
    return
  fi
  timeout "$left" python3 bench/gpu_11b.py "$@" --json 2>"$OUT/$name.err" | tail -n 1 | tee "$OUT/$name.json"
  rc=${PIPESTATUS[0]}
  ((rc == 0)) || failed=1
  echo "# $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

step build build "$MODEL" --arch "$ARCH"
[[ -f "$MODEL/config.json" ]] || { echo "the model was not built: see $OUT/build.err"; exit 1; }
step train_trace train "$MODEL" --seq "$SEQ" --memory_trace 12 "${TRAIN_FLAGS[@]}"
step train_peft_dropout train "$MODEL" --seq "$SEQ" --lean_lora_dropout false "${TRAIN_FLAGS[@]}"
step infer infer "$MODEL" --max_stage_tokens 64 --repeats 2
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step train_expandable train "$MODEL" --seq "$SEQ" "${TRAIN_FLAGS[@]}"
exit "$failed"
