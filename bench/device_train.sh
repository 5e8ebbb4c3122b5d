#!/usr/bin/env bash
# Train the shipped model further on a lent GPU in one bounded device call, keeping everything as it goes.
#
# The device tool brings back at most 8 files from $OUT, so the run leaves exactly these there:
#   log.txt        everything the steps below print
#   metrics.jsonl  the trainer's loss / lr / images-per-second log, copied every 20 s while it trains
#   unet.tar       unet/ (config + fp16 safetensors) of the newest complete checkpoint's EMA weights
#   eval.json      `diffxattn eval` of that pipeline (fp32) on the GPU: full sets, 2 seeds, guidance 4
# Training is stopped after TRAIN_S seconds (default 360) if it has not finished: the newest complete
# checkpoint is exported and scored, so a time limit loses at most one checkpoint interval.
#
# Default recipe, stage 3 of pipelines/shapes-32 (README there): its UNet and frozen text encoder, two-object
# scenes 70% of the time, scenes no earlier stage drew (data.seed 3), 3,000 steps x 256 at lr 1e-4, bf16 (of the
# three CPU pilots in the README there, 70% at lr 1e-4 kept single-object accuracy and raised two-object accuracy).
# Arguments are config overrides appended to it (later ones win), e.g. train.max_steps=1500. CONFIG picks another
# config; the CPU recipe's 2x2 patch-stem layout (twice the training speed, the layout the speed benchmarks want:
# bench/README.md) from scratch with the shipped text encoder:
#   CONFIG=configs/shapes-32-cpu.yaml bash bench/device_train.sh model.pretrained=null data.two_object_prob=0.5 \
#       optim.lr=8e-4
# bench/device_train_both.sh runs both side by side in one device call (what to run when a GPU is lent).
#
# Here, once (diffusers is not installed on the device; the wheels travel in the ignored .whl/ folder):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Then the device tool:
#   run(command="bash bench/device_train.sh", carry=[".whl"], timeout_s=600)
# and back here: tar -xf FILES_AT/unet.tar -C pipelines/shapes-32 (if eval.json beats pipelines/shapes-32/eval.json),
# then score it on this machine as the model card does: diffxattn eval pipelines/shapes-32 --seeds 2.
#
# On a CPU (a tiny end-to-end check): OUT=/tmp/out TRAIN_S=60 EVAL_ARGS=--quick bash bench/device_train.sh \
#   train.max_steps=2 train.batch_size=4 train.checkpoint_every=1 train.mixed_precision=no data.num_workers=0
set -uo pipefail
out=${OUT:?set OUT to the folder whose files come back}
run=${RUN_DIR:-/tmp/device-run}
train_s=${TRAIN_S:-360}
config=${CONFIG:-configs/shapes-32.yaml}
cd "$(dirname "$0")/.."
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1

if ! python3 -c "import diffusers" 2> /dev/null; then  # the device: the carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$run-site" \
        .whl/*.whl || exit 1
    export PYTHONPATH="$run-site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

rm -rf "$run"
(while sleep 20; do cp "$run/metrics.jsonl" "$out/" 2> /dev/null; done) &
copier=$!
start=$(date +%s)
timeout --signal=INT --kill-after=30 "$train_s" python3 -m accelerate.commands.launch --num_processes 1 \
    -m diffxattn.train "$config" \
    model.pretrained=pipelines/shapes-32 text.pretrained=pipelines/shapes-32 text.train=false \
    data.two_object_prob=0.7 data.seed=3 data.length=4000000 data.num_workers=12 \
    optim.lr=1e-4 optim.warmup_steps=100 train.batch_size=256 train.max_steps=3000 train.mixed_precision=bf16 \
    train.checkpoint_every=500 logging.validate_every=1000000 logging.tensorboard=false \
    train.output_dir="$run" "$@"
echo "training exit code $? after $(( $(date +%s) - start )) s"
kill "$copier" 2> /dev/null
cp "$run/metrics.jsonl" "$out/" 2> /dev/null

checkpoint=$(python3 -c "import sys; from diffxattn.checkpoint import latest_checkpoint as f; print(f(sys.argv[1]) or '')" \
    "$run/checkpoints")
if [ -z "$checkpoint" ]; then
    echo "no complete checkpoint in $run/checkpoints: nothing to export"
    exit 1
fi
python3 -m diffxattn.train export "$checkpoint" -o "$run/export" || exit 1
mkdir -p "$run/fp16/unet" && cp "$run/export/unet/config.json" "$run/fp16/unet/"
python3 - "$run/export/unet" "$run/fp16/unet" <<'EOF'
import sys

from safetensors.torch import load_file, save_file

name = "diffusion_pytorch_model.safetensors"
save_file({k: v.half() for k, v in load_file(f"{sys.argv[1]}/{name}").items()}, f"{sys.argv[2]}/{name}")
EOF
tar -cf "$out/unet.tar" -C "$run/fp16" unet && echo "unet.tar: $checkpoint, $(du -h "$out/unet.tar" | cut -f1)"
# shellcheck disable=SC2086  # EVAL_ARGS: several options
python3 -m diffxattn.cli eval "$run/export" --seeds 2 --guidance 4 --no-heatmaps --no-edits ${EVAL_ARGS:-} \
    -o "$out/eval.json"
