"""What `main.py --mode=...` runs: a table from (stage, mode) to function.

Each stage module owns its wiring (`make_stage`) and its modes; this file
only checks what every config shares, records the config in the workdir
and dispatches. The workdir layout is `maskgit_jax.workdir`'s.
"""

from typing import Any, Callable, Dict, Tuple

import ml_collections

from maskgit_jax import workdir as workdir_lib
from maskgit_jax.train import loop
from maskgit_jax.train import tokenizer_stage
from maskgit_jax.train import transformer_stage

STAGES = {"tokenizer": tokenizer_stage, "transformer": transformer_stage}
MODES = ("train", "tokenize", "sample", "eval")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what every stage's config shares, before anything is compiled."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; valid: {tuple(STAGES)}.")
  if config.on_nonfinite not in ("error", "skip"):
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; valid: "
                     "'error', 'skip'.")
  for key in ("num_train_steps", "batch_size", "checkpoint_every_steps",
              "log_every_steps"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")
  if int(config.eval_every_steps) < 0:
    raise ValueError(f"config.eval_every_steps must be >= 0 (0: no "
                     f"evaluation while training), got "
                     f"{config.eval_every_steps}.")
  STAGES[config.stage].validate(config)


def train(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """--mode=train: trains (or resumes) the config's stage in `workdir`."""
  validate(config)
  stage = STAGES[config.stage].make_stage(config, workdir)
  workdir_lib.Workdir(workdir).write_config(config)
  return loop.train_and_evaluate(config, workdir, stage)


def _lazy(module: str, function: str) -> Callable[..., Any]:
  """A job of maskgit_jax.evaluation, imported when it runs."""
  def job(config: ml_collections.ConfigDict, workdir: str) -> Any:
    import importlib
    return getattr(importlib.import_module(
        f"maskgit_jax.evaluation.{module}"), function)(config, workdir)
  job.__name__ = f"{module}.{function}"
  return job


JOBS: Dict[Tuple[str, str], Callable[[ml_collections.ConfigDict, str], Any]] = {
    ("tokenizer", "train"): train,
    ("tokenizer", "tokenize"): tokenizer_stage.tokenize_mode,
    ("tokenizer", "eval"): _lazy("tokenizer_eval", "evaluate_tokenizer"),
    ("transformer", "train"): train,
    ("transformer", "sample"): transformer_stage.sample_mode,
    ("transformer", "eval"): _lazy("transformer_eval",
                                   "evaluate_transformer"),
}


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> Any:
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}; valid: {MODES}.")
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; valid: {tuple(STAGES)}.")
  job = JOBS.get((config.stage, mode))
  if job is None:
    valid = [m for s, m in JOBS if s == config.stage]
    raise ValueError(f"--mode={mode} does not apply to a {config.stage} "
                     f"config; valid modes for it: {valid}.")
  return job(config, workdir)
