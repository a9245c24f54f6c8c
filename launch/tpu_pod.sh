#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU pod slice. jax finds the
# other hosts itself; the workdir must be shared storage (gs://...).
#
#   TPU=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh \
#       --config=configs/maskgit_imagenet256.py --workdir=gs://bucket/maskgit256 \
#       --config.tokenizer_workdir=gs://bucket/vqgan256
#
# First time only: launch/tpu_pod.sh --setup (clones nothing: it copies this
# checkout to the workers and installs it).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo_dir=maskgit_jax
if [[ "${1:-}" == "--setup" ]]; then
  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
    "$(git rev-parse --show-toplevel)" "$TPU:$repo_dir"
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
    "cd $repo_dir && python3 -m pip install -e . 'jax[tpu]'"
  exit 0
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd $repo_dir && python3 -m maskgit_jax.main $*"
