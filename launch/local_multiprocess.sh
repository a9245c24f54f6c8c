#!/usr/bin/env bash
# N processes of one job on this machine, talking over localhost: the way to
# try a multi-host setup (process-local batches, collective checkpoints,
# process-0 logging) without a cluster. CPU collectives use gloo.
#
#   DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh 2 \
#       --config=configs/vqgan_fashion_mnist.py:tiny --workdir=/tmp/vqgan_2proc
#
# Every argument after N goes to `python -m maskgit_jax.main` unchanged; the
# workdir is shared by all processes (`config.batch_size` is global and is
# split between them). Settings, from the environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 1), through
#                        XLA_FLAGS=--xla_force_host_platform_device_count
#   PYTHON               interpreter (default .venv/bin/python)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   MASKGIT_INIT_TIMEOUT_S  seconds the processes wait for each other
#   GRACE_S              seconds a stopped process gets to save its
#                        checkpoint before it is killed (default 30)
# When one process fails, or on Ctrl-C, the others get SIGTERM (the trainer
# saves a checkpoint and exits), then SIGKILL after GRACE_S; the exit status
# is that of the first process that failed (130 after Ctrl-C, 143 after
# SIGTERM). Re-running
# the same command resumes from the workdir.
set -euo pipefail

usage="usage: $0 NUM_PROCESSES --config=... --workdir=... [main.py flags]"
num_processes=${1:?$usage}
shift
devices=${DEVICES_PER_PROCESS:-1}
grace_s=${GRACE_S:-30}
python=${PYTHON:-.venv/bin/python}
for pair in "NUM_PROCESSES=$num_processes" "DEVICES_PER_PROCESS=$devices" \
            "GRACE_S=$grace_s"; do
  if [[ ! ${pair#*=} =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $pair is not an integer >= 1. $usage" >&2
    exit 2
  fi
done
if [[ -z ${PORT:-} ]]; then
  # Ask the OS for a free port (the coordinator binds it in process 0).
  PORT=$("$python" -c 'import socket; s = socket.socket();
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# The user's XLA flags, without any device count, plus ours.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] ||
    xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

pids=()
stop_all() {  # SIGTERM to the processes still running, SIGKILL after grace.
  local pid deadline=$((SECONDS + grace_s))
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
interrupted() {
  echo "interrupted: stopping all processes" >&2
  stop_all
  exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

echo "starting $num_processes processes x $devices CPU devices," \
  "coordinator 127.0.0.1:$PORT" >&2
for ((i = 0; i < num_processes; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$num_processes \
  JAX_PROCESS_ID=$i JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags \
    "$python" -m maskgit_jax.main "$@" &
  pids+=($!)
done

# Poll (portable to old bash, unlike `wait -n -p`): the first process to
# exit non-zero stops the rest, and its status is ours.
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    status=0
    wait "$pid" || status=$?
    if ((status != 0)); then
      echo "a process (pid $pid) exited with status $status:" \
        "stopping the others" >&2
      trap - INT TERM
      stop_all
      exit "$status"
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if ((${#running[@]})); then sleep 0.5; fi
done
echo "all $num_processes processes finished" >&2
