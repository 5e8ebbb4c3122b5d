#!/usr/bin/env bash
# Both GPU training runs in one device call, side by side on the one GPU (each model is small: the data loaders,
# not the GPU, set the pace, so the 16 cores are split between them):
#   stage3/  bench/device_train.sh's default: stage 3 of pipelines/shapes-32, its layout, fine-tuned
#   patch/   the CPU recipe's 2x2 patch-stem layout (configs/shapes-32-cpu.yaml) from scratch with the shipped text
#            encoder, 3,000 steps x 256 at lr 8e-4 (the shipped model's stages 1 + 2 saw 716,800 images; this is
#            768,000): the layout the speed targets want (bench/README.md)
# Each folder gets device_train.sh's four files, so the device tool's eight come back. Arguments are config
# overrides for both runs; TRAIN_S, EVAL_ARGS are passed on. The device tool:
#   run(command="bash bench/device_train_both.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
out=${OUT:?set OUT to the folder whose files come back}
run=${RUN_DIR:-/tmp/device-run}
cd "$(dirname "$0")/.."
OUT="$out/stage3" RUN_DIR="$run-stage3" bash bench/device_train.sh data.num_workers=6 "$@" &
stage3=$!
OUT="$out/patch" RUN_DIR="$run-patch" CONFIG=configs/shapes-32-cpu.yaml bash bench/device_train.sh \
    model.pretrained=null data.two_object_prob=0.5 optim.lr=8e-4 data.num_workers=6 "$@" &
patch=$!
wait "$stage3"; a=$?
wait "$patch"; b=$?
echo "stage3 exit code $a, patch exit code $b"
[ "$a" -eq 0 ] && [ "$b" -eq 0 ]
