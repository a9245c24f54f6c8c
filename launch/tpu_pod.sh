#!/usr/bin/env bash
# A Cloud TPU pod slice, from creation to deletion. Run from this checkout,
# on a machine with gcloud (logged in, project set):
#
#   export TPU=maskgit-v4-64 ZONE=us-central2-b ACCELERATOR_TYPE=v4-64
#   launch/tpu_pod.sh setup    # create the slice, copy + install the code
#   launch/tpu_pod.sh run --config=configs/vqgan_imagenet256.py \
#       --workdir=gs://BUCKET/vqgan256 --config.data.data_dir=/mnt/disks/data
#   launch/tpu_pod.sh delete   # stop paying for it
#
# Settings (environment):
#   TPU               name of the TPU VM slice (required)
#   ZONE              its zone, e.g. us-central2-b for v4 (required)
#   ACCELERATOR_TYPE  setup: slice type, e.g. v4-64 (32 chips, 8 hosts)
#   RUNTIME_VERSION   setup: TPU VM image (default tpu-ubuntu2204-base)
#   SPOT=1            setup: a spot slice (cheaper; may be preempted)
#   DATA_DISK         setup: a persistent disk holding the prepared dataset
#                     (projects/P/zones/Z/disks/D), attached read-only to
#                     every worker and mounted at /mnt/disks/data
#   REMOTE_PYTHON     python on the workers (default python3.11: the
#                     package needs >= 3.11; installed with apt if missing)
#   MASKGIT_INIT_TIMEOUT_S  run: seconds the workers wait for each other
#
# Every worker runs the same command (gcloud ... ssh --worker=all); jax finds
# the other workers through the TPU VM metadata server. The workdir must be
# a gs:// path: each worker has its own disk, and all of them read and write
# the same checkpoints. Re-running the same `run` command resumes from the
# newest checkpoint there (after a preemption: `setup` again if the slice
# was deleted, then `run`).
set -euo pipefail

usage="usage: $0 setup | run MAIN_FLAGS... | delete"
command=${1:?$usage}
shift
: "${TPU:?set TPU to the name of the TPU VM slice}"
: "${ZONE:?set ZONE to the zone of the slice}"
remote_dir=maskgit_jax
remote_python=${REMOTE_PYTHON:-python3.11}

on_all_workers() {  # One shell command, on every worker at the same time.
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
    --command="$1"
}

setup() {
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-64}"
  # 1. Create the slice, unless it exists (setup can be re-run to update
  #    the code on the workers).
  if gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" \
      >/dev/null 2>&1; then
    echo "$TPU exists; updating the code on its workers" >&2
  else
    local extra=()
    if [[ ${SPOT:-0} == 1 ]]; then extra+=(--spot); fi
    if [[ -n ${DATA_DISK:-} ]]; then
      extra+=("--data-disk=source=$DATA_DISK,mode=read-only")
    fi
    gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" \
      --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}" \
      "${extra[@]+"${extra[@]}"}"
  fi
  # 2. Pack this checkout as it is (committed and uncommitted files, not
  #    what .gitignore leaves out such as .venv and workdirs) and copy it
  #    to every worker.
  local tmp
  tmp=$(mktemp -d)
  (cd "$(git rev-parse --show-toplevel)" &&
    git ls-files -z --cached --others --exclude-standard |
    tar --null -T - -czf "$tmp/maskgit_jax.tar.gz")
  gcloud compute tpus tpu-vm scp "$tmp/maskgit_jax.tar.gz" "$TPU:" \
    --zone="$ZONE" --worker=all
  rm -rf "$tmp"
  # 3. On every worker: unpack into ~/maskgit_jax, make a venv there and
  #    install the package with jax[tpu] (libtpu) and gcsfs (gs:// paths).
  on_all_workers "set -e
    if ! command -v $remote_python >/dev/null; then
      sudo apt-get update -q
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        $remote_python $remote_python-venv
    fi
    rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir
    tar -xzf ~/maskgit_jax.tar.gz -C ~/$remote_dir
    cd ~/$remote_dir
    $remote_python -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e . 'jax[tpu]' gcsfs"
  # 4. Mount the dataset disk, read-only, at the same path on every worker.
  if [[ -n ${DATA_DISK:-} ]]; then
    on_all_workers "set -e
      sudo mkdir -p /mnt/disks/data
      mountpoint -q /mnt/disks/data ||
        sudo mount -o ro,noload /dev/sdb /mnt/disks/data"
  fi
  echo "$TPU is ready: launch/tpu_pod.sh run --config=... --workdir=gs://..." \
    >&2
}

run() {
  if (($# == 0)); then
    echo "$usage" >&2
    exit 2
  fi
  local arg flags=""
  for arg in "$@"; do
    if [[ $arg == --workdir=* && $arg != --workdir=gs://* ]]; then
      echo "error: $arg: the workdir of a pod job must be a gs:// path" \
        "(every worker writes the same checkpoints)" >&2
      exit 2
    fi
    flags+=" $(printf '%q' "$arg")"
  done
  # MASKGIT_DISTRIBUTED=auto: jax.distributed.initialize on every worker,
  # which finds the slice's workers in the TPU VM metadata.
  on_all_workers "cd ~/$remote_dir &&
    MASKGIT_DISTRIBUTED=auto \
    MASKGIT_INIT_TIMEOUT_S=${MASKGIT_INIT_TIMEOUT_S:-300} \
    .venv/bin/python -m maskgit_jax.main$flags"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" --quiet
}

case $command in
  setup) setup ;;
  run) run "$@" ;;
  delete) delete ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
