"""Test setup: 8 fake CPU devices for the sharding tests.

XLA reads the flag when jax starts, so it must be set before any test module
imports jax. Unsharded computations still run on one device.

The tests' programs are tiny and mostly compiled to run a few times, so
compiling dominates: XLA:CPU's backend optimisation level 0 (LLVM -O0, not
the default -O3) compiles about twice as fast as -O1, and although its
programs run about four times slower, the whole suite took 9:51 instead of
11:47-12:04 at -O1 on a 2-core machine (2026-12-07). The HLO passes are the
same, and so are the numbers (no fast-math either way). Set
--xla_backend_optimization_level in XLA_FLAGS to override it;
`helpers.run_main` passes it on to the entry point's processes.

For the same reason the tests turn off XLA:CPU's MLIR fusion emitters
(--xla_cpu_use_fusion_emitters=false: the older elemental emitters, which
compile faster). The shared tokenizer GAN step compiled in 4.9-6.7 s
instead of 8.2-9.1 s, with the same loss to 8 digits and the same run time,
and the suite took 7:52 instead of 10:41 half an hour earlier on the same
2-core machine (2026-12-07). Set the flag in XLA_FLAGS to override it.

Many tests (and the entry-point processes they start) compile the same
programs again; a persistent compilation cache, fresh for each session and
removed at its end, lets every program after the first load from disk.
Set JAX_COMPILATION_CACHE_DIR to keep (or to share) one instead.

Below that, the session's shared trained workdirs: each stage is trained
once, end to end through `python -m maskgit_jax.main` on its tiny config,
and every test that only reads a trained run uses these. Under pytest-xdist
the first worker to need one trains it and the others read it (tests that
write there copy it first, or write only files of their own).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
for _flag, _value in (("--xla_backend_optimization_level", "0"),
                      ("--xla_cpu_use_fusion_emitters", "false")):
  if _flag not in os.environ["XLA_FLAGS"]:  # else the caller's setting
    os.environ["XLA_FLAGS"] += f" {_flag}={_value}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  _CACHE = tempfile.mkdtemp(prefix="maskgit_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import fcntl  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import types  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory):
  """(source_dir, data_dir): the tiny idx dataset and a TFDS folder."""
  root = str(tmp_path_factory.mktemp("idx"))
  helpers.write_garments(root)
  return root, str(tmp_path_factory.mktemp("tfds"))


def _main(*args):
  """`main ARGS` in a fresh process, which must succeed: its stdout, stderr
  and returncode."""
  result = helpers.run_main(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  return {"stdout": result.stdout, "stderr": result.stderr,
          "returncode": result.returncode}


def _built_once(tmp_path_factory, name, build):
  """`build(folder)`'s record (JSON), computed once per session: without
  xdist here, under xdist by the first worker to ask, under a file lock in
  the folder all workers share, while the others wait and then read it."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return build(str(tmp_path_factory.mktemp(name)))
  shared = tmp_path_factory.getbasetemp().parent
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    record = shared / f"{name}.json"
    if not record.exists():
      folder = shared / name
      folder.mkdir()
      record.write_text(json.dumps(build(str(folder))))
    return json.loads(record.read_text())


def _run(record):
  """A record of `_main`s as attributes: .workdir, .train.stderr, ..."""
  return types.SimpleNamespace(**{
      key: types.SimpleNamespace(**value) if isinstance(value, dict) else value
      for key, value in record.items()})


@pytest.fixture(scope="session")
def tokenizer_run(data_dirs, tmp_path_factory):
  """The tokenizer's end-to-end run: `main` trains the tiny config (every
  loss term, LPIPS and the GAN included) for 4 steps, then `--mode=tokenize`
  writes its token cache. (.workdir, and .train and .tokenize with each
  process's .stdout, .stderr and .returncode)."""
  def build(workdir):
    args = [f"--config={helpers.TOKENIZER_CONFIG}", f"--workdir={workdir}",
            f"--config.data.source_dir={data_dirs[0]}",
            f"--config.data.data_dir={data_dirs[1]}"]
    return {"workdir": workdir, "train": _main(*args),
            "tokenize": _main(*args, "--mode=tokenize")}
  return _run(_built_once(tmp_path_factory, "vqgan", build))


@pytest.fixture(scope="session")
def tokenizer_workdir(tokenizer_run):
  return tokenizer_run.workdir


@pytest.fixture(scope="session")
def transformer_run(tokenizer_workdir, tmp_path_factory):
  """The transformer's end-to-end run: `main` trains the tiny config for 4
  steps on the tokenizer run's cache (a sample grid at step 4)."""
  def build(workdir):
    return {"workdir": workdir, "train": _main(
        f"--config={helpers.TRANSFORMER_CONFIG}", f"--workdir={workdir}",
        f"--config.tokenizer_workdir={tokenizer_workdir}")}
  return _run(_built_once(tmp_path_factory, "maskgit", build))


@pytest.fixture(scope="session")
def transformer_workdir(transformer_run):
  return transformer_run.workdir


# The files that take longest (a minute or more of CPU each on 2 cores), in
# the order xdist should hand them out: first, so that the workers end
# together rather than one finishing a long file alone. Each worker starts
# with two files: the first worker builds the session's trained workdirs
# (test_eval_jobs needs them at once) while the second runs long files that
# do not need them (test_tokenizer_stage reads them only in its last test).
LONG_FILES_FIRST = ("test_eval_jobs.py", "test_tokenizer_stage.py",
                    "test_transformer_stage.py", "test_sharding.py",
                    "test_multiprocess.py", "test_official.py",
                    "test_benchmarks.py", "test_plan.py", "test_models.py")


def pytest_configure(config):
  # pytest-xdist >= 3.6 hands out files with the most tests first unless
  # told otherwise, which would put the few long tests of the files above
  # last (the suite took 12 min instead of 10 on 2 cores).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return (LONG_FILES_FIRST.index(name) if name in LONG_FILES_FIRST
            else len(LONG_FILES_FIRST))
  items.sort(key=rank)  # stable: each file keeps its tests' order
