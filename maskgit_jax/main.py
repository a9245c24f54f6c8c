r"""Entry point: train, tokenize, sample or evaluate from a config file.

  python -m maskgit_jax.main --config=configs/vqgan_fashion_mnist.py \
      --workdir=workdirs/vqgan_fashion_mnist [--mode=train] \
      [--config.num_train_steps=2000]

The config says which stage it trains (`config.stage`). The resolved config
is written to the workdir; re-running the same command resumes.
Modes: train (default), tokenize (tokenizer workdirs: encode the training
set once into the token cache stage 2 reads), sample (transformer workdirs:
a PNG grid of class-conditional samples), eval (a tokenizer: rFID, PSNR,
LPIPS, codebook usage and perplexity; a transformer: FID, IS,
precision/recall and CAS of generated samples, see
maskgit_jax/evaluation/), each written to eval/<name>.json.
"""

import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from maskgit_jax import checkpoints
from maskgit_jax import host_memory
from maskgit_jax import parallel

MODES = ("train", "tokenize", "sample", "eval")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/vqgan_fashion_mnist.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_DISTRIBUTED_TIMEOUT_S = flags.DEFINE_integer(
    "distributed_timeout_s", None,
    "Seconds a multi-process job waits for all processes to meet at the "
    "coordinator before failing (default: env MASKGIT_INIT_TIMEOUT_S, "
    "else 300).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.keep_freed_memory()  # Before XLA starts its threads.
  try:
    parallel.initialize_distributed(_DISTRIBUTED_TIMEOUT_S.value)
  except (parallel.DistributedInitError, ValueError) as error:
    sys.exit(f"Error: {error}")  # Names the settings; a trace would not help.
  from maskgit_jax.train import jobs  # After distributed init.
  # Orbax and grain log every save at INFO; our own news goes to stderr.
  logging.set_verbosity(logging.WARNING)
  try:
    jobs.run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except (checkpoints.DiskFullError, checkpoints.IncompatibleCheckpointError,
          checkpoints.UnrestorableCheckpointsError) as error:
    sys.exit(f"Error: {error}")  # The message says all; skip orbax's trace.
  except checkpoints.CheckpointRestoreError as error:
    # Not damage: the cause may be a bug, so its trace is worth showing.
    traceback.print_exception(error.__cause__ or error, file=sys.stderr)
    sys.exit(f"Error: {error}")


if __name__ == "__main__":
  app.run(main)
