#!/usr/bin/env bash
# N processes of one training job on this machine, talking over localhost
# (CPU collectives use gloo). Each process gets an equal share of the CPU
# devices and of the global batch; the workdir is shared.
#
#   launch/local_multiprocess.sh 2 --config=configs/vqgan_fashion_mnist.py \
#       --workdir=workdirs/vqgan_2proc
set -euo pipefail
num_processes=${1:?usage: $0 NUM_PROCESSES --config=... --workdir=... [flags]}
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-.venv/bin/python}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$num_processes \
  JAX_PROCESS_ID=$i JAX_PLATFORMS=cpu \
    "$python" -m maskgit_jax.main "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
