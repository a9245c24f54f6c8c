#!/usr/bin/env bash
# The accelerator figures that benchmarks/RESULTS.md asks for, in one
# command sized for one H100/H200 and one 10-minute call:
#   - the 24-layer ImageNet-256 transformer's train step in bfloat16: its
#     examples/s, flop_utilization against bfloat16 matmuls measured in the
#     same process, and the MFU against the chip's datasheet peak;
#   - Pipeline.generate at ImageNet-256 sizes (float32, as every Pipeline
#     runs): images/s.
# Records: $OUT/train_throughput_imagenet256_bf16.json and
# $OUT/sample_throughput_imagenet256.json (OUT defaults to
# benchmarks/results).
#
#   OUT=/tmp/out bash benchmarks/accelerator_bf16.sh
#
# Knobs (environment): PYTHON (default python3), TRAIN_BATCH (64; the
# config's 256 is a pod's global batch), SAMPLE_BATCH (32), STEPS (10),
# PEAK_SIZES (4096,8192), and EXTRA_TRAIN / EXTRA_SAMPLE for more flags,
# e.g. a smoke run on a CPU:
#   TRAIN_BATCH=2 SAMPLE_BATCH=1 STEPS=1 PEAK_SIZES=256 \
#   EXTRA_TRAIN="--set=transformer.num_layers=1 --set=transformer.hidden_size=32 \
#     --set=transformer.mlp_dim=32 --set=transformer.num_heads=2 --num_tokens=16" \
#   EXTRA_SAMPLE="--set=transformer.num_layers=1 --set=transformer.hidden_size=32 \
#     --set=transformer.mlp_dim=32 --set=transformer.num_heads=2 \
#     --set=sampling.num_iter=2 --tokenizer_config=configs/vqgan_fashion_mnist.py:tiny" \
#   OUT=/tmp/out bash benchmarks/accelerator_bf16.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
TRAIN_BATCH=${TRAIN_BATCH:-64}
SAMPLE_BATCH=${SAMPLE_BATCH:-32}
STEPS=${STEPS:-10}
PEAK_SIZES=${PEAK_SIZES:-4096,8192}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# shellcheck disable=SC2086  # EXTRA_* are flag lists, split on purpose
"$PYTHON" benchmarks/train_throughput.py \
    --config=configs/maskgit_imagenet256.py --set=dtype=bfloat16 \
    --set=batch_size="$TRAIN_BATCH" --codebook_size=1024 --num_tokens=256 \
    --rounds=1 --repeats=3 --steps="$STEPS" --peak_sizes="$PEAK_SIZES" \
    ${EXTRA_TRAIN:-} --out="$OUT/train_throughput_imagenet256_bf16.json"

# shellcheck disable=SC2086
"$PYTHON" benchmarks/sample_throughput.py \
    --config=configs/maskgit_imagenet256.py --batch_size="$SAMPLE_BATCH" \
    --rounds=1 --repeats=3 --peak_sizes="$PEAK_SIZES" \
    ${EXTRA_SAMPLE:-} --out="$OUT/sample_throughput_imagenet256.json"
