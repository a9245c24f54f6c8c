"""Multi-host initialisation: settings checked before jax is called, and a
job whose processes cannot meet fails within its timeout, saying why."""

import os
import subprocess
import sys
import time

import jax
import pytest

from helpers import REPO, TOKENIZER_CONFIG, free_port, one_device_env
from maskgit_jax import parallel

ADDRESS = "127.0.0.1:1234"


def explicit(address=ADDRESS, count="2", process_id="1", **extra):
  env = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": count,
         "JAX_PROCESS_ID": process_id, **extra}
  return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("env, missing", [
    (explicit(count=None, process_id=None),
     "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
    (explicit(address=None), "JAX_COORDINATOR_ADDRESS missing"),
    (explicit(process_id=None), "JAX_PROCESS_ID missing"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES"),
])
def test_partial_explicit_settings_name_what_is_missing(env, missing):
  with pytest.raises(ValueError, match=missing):
    parallel.initialize_distributed(env=env)


@pytest.mark.parametrize("process_id", ["2", "-1", "7"])
def test_process_id_out_of_range_names_value_and_range(process_id):
  with pytest.raises(ValueError,
                     match=rf"JAX_PROCESS_ID={process_id} .*\[0, 2\)"):
    parallel.initialize_distributed(env=explicit(process_id=process_id))


def test_process_id_not_an_integer():
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='first'"):
    parallel.initialize_distributed(env=explicit(process_id="first"))


@pytest.mark.parametrize("count", ["0", "-3", "two", "1.5"])
def test_bad_process_count_is_named(count):
  with pytest.raises(ValueError, match=f"JAX_NUM_PROCESSES='{count}'"):
    parallel.initialize_distributed(env=explicit(count=count))


@pytest.mark.parametrize("address", [
    "localhost", "10.0.0.1:", ":1234", "host:0", "host:65536", "host:port",
    "host:-1", "my host:1234"])
def test_bad_coordinator_address_is_named(address):
  with pytest.raises(ValueError, match=(
      f"JAX_COORDINATOR_ADDRESS='{address}' is not host:port")):
    parallel.initialize_distributed(env=explicit(address=address))


@pytest.mark.parametrize("address", ["10.0.0.1:1", "node-7.cluster:65535",
                                     "[::1]:8476"])
def test_good_addresses_pass_validation(address):
  # Count 1: validated, then nothing to initialise.
  parallel.initialize_distributed(env=explicit(address=address, count="1",
                                               process_id="0"))
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env", [
    {},
    {"JAX_NUM_PROCESSES": "1"},
    explicit(count="1", process_id="0"),
    {"SLURM_JOB_ID": "12", "SLURM_NTASKS": "1"},
    {"TPU_WORKER_HOSTNAMES": "t1v-worker-0"},
])
def test_one_process_does_nothing(env):
  parallel.initialize_distributed(env=env)
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1


def test_one_process_still_checks_its_id():
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=1 .*\[0, 1\)"):
    parallel.initialize_distributed(env=explicit(count="1", process_id="1"))


@pytest.mark.parametrize("timeout, env, message", [
    (0, {}, "timeout_s=0"),
    (-5, {}, "timeout_s=-5"),
    (None, {"MASKGIT_INIT_TIMEOUT_S": "soon"}, "MASKGIT_INIT_TIMEOUT_S='soon'"),
    (None, {"MASKGIT_INIT_TIMEOUT_S": "0"}, "MASKGIT_INIT_TIMEOUT_S='0'"),
])
def test_bad_timeout_is_named(timeout, env, message):
  with pytest.raises(ValueError, match=message):
    parallel.initialize_distributed(timeout, env=explicit(**env))


def test_bad_slurm_task_count_and_mode_are_named():
  with pytest.raises(ValueError, match="SLURM_NTASKS='many'"):
    parallel.initialize_distributed(
        env={"SLURM_JOB_ID": "12", "SLURM_NTASKS": "many"})
  with pytest.raises(ValueError, match="MASKGIT_DISTRIBUTED='yes'"):
    parallel.initialize_distributed(env={"MASKGIT_DISTRIBUTED": "yes"})


def test_nobody_at_the_coordinator_raises_within_timeout():
  """Process 1 polls process 0's port before jax connects: with nothing
  there it raises after the timeout, naming the address, and leaves jax
  uninitialised."""
  address = f"127.0.0.1:{free_port()}"
  start = time.monotonic()
  with pytest.raises(parallel.DistributedInitError) as failed:
    parallel.initialize_distributed(1, env=explicit(address=address))
  assert 1 <= time.monotonic() - start < 5
  message = str(failed.value)
  assert f"process 1 of 2 could not meet the others at coordinator {address}"\
      " within 1 s (nobody is listening there" in message
  assert "same coordinator address and process count" in message
  assert not jax.distributed.is_initialized()


def test_failed_cluster_detection_is_wrapped():
  """SLURM with several tasks but outside `srun` (no node list): jax's
  detection finds no coordinator, and the error says what was tried."""
  code = ("from maskgit_jax import parallel\n"
          "try:\n"
          "  parallel.initialize_distributed(5)\n"
          "except parallel.DistributedInitError as error:\n"
          "  print('CAUGHT', error)\n")
  env = {k: v for k, v in one_device_env().items()
         if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
  result = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
      env=dict(env, JAX_PLATFORMS="cpu", SLURM_JOB_ID="7", SLURM_NTASKS="4",
               SLURM_PROCID="2"), timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
  assert ("CAUGHT Multi-host JAX initialisation failed (SLURM): process 2 of "
          "4 could not meet the others at coordinator (chosen by jax) within "
          "5 s (ValueError: coordinator_address should be defined.)"
          ) in result.stdout


def _main_alone(process_id, port, tmp_path, timeout_s=5):
  """`main` as process `process_id` of 2, with no other process started."""
  env = dict(one_device_env(), JAX_PLATFORMS="cpu",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "maskgit_jax.main",
       f"--config={TOKENIZER_CONFIG}", f"--workdir={tmp_path}",
       f"--distributed_timeout_s={timeout_s}"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=90)
  return result, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("process_id", [1, 0])
def test_lonely_process_fails_within_timeout(process_id, tmp_path):
  """Process 1 with nobody at the coordinator address, and process 0 (the
  coordinator) whose peer never comes: both exit non-zero after about the
  5 s timeout, naming the address, the process, the count and the fix."""
  port = free_port()
  result, elapsed = _main_alone(process_id, port, tmp_path)
  assert result.returncode != 0
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("Error: Multi-host JAX initialisation failed")
  assert f"process {process_id} of 2" in message
  assert f"127.0.0.1:{port}" in message
  assert "within 5 s" in message
  assert "same coordinator address and process count" in message
  assert "Traceback" not in result.stderr
  assert 4 < elapsed < 60, elapsed  # It waited, then gave up on time.
  assert not os.path.exists(tmp_path / "config.json")  # Failed before work.
