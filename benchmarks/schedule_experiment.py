r"""Mask schedule x number of iterations: FID and CAS on trained models.

The paper (Sec. 4.4, Fig. 3) reports that concave mask schedules (cosine,
square, cubic, exp) beat linear, which beats convex ones (sqrt, log), and
that each schedule has a sweet spot in the number of decoding iterations.
This script tests both claims on any trained pair of workdirs, by default
the demo's (`make demo` first):

  python benchmarks/schedule_experiment.py \
      --out=benchmarks/results/schedule_experiment.json \
      --table=docs/schedule_experiment.md --plot_dir=docs

Each schedule is one `--mode=eval` job sweeping `num_iter` (the same code
path, feature network and reference as `make demo`'s evaluation), with
--seeds seeds of --num_samples class-balanced samples per point; results
also land in the transformer workdir as eval/schedule_<name>.json, and a
schedule whose result is already there with the same settings is not run
again (so an interrupted experiment resumes). The JSON holds every point
(mean and spread over seeds); the table and the plots (FID and CAS against
iterations, one line per schedule) go to --table and --plot_dir.
"""

import json
import os
import sys
import time
from typing import Any, Dict, List

from absl import app
from absl import flags
from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "demo_output", "workdirs")

# The paper's grouping (Fig. 3): how a schedule spends its iterations.
SHAPES = {"cosine": "concave", "square": "concave", "cubic": "concave",
          "exp": "concave", "linear": "linear", "sqrt": "convex",
          "log": "convex"}

_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join(DEMO, "maskgit_fashion_mnist"),
    "Transformer workdir.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer_workdir", None, "Tokenizer workdir (default: the one the "
    "transformer was trained on).")
_CLASSIFIER = flags.DEFINE_string(
    "classifier", os.path.join(DEMO, "classifier.npz"),
    "Feature classifier npz (Fashion-MNIST); empty keeps the run's "
    "config.eval feature network.")
_SCHEDULES = flags.DEFINE_list("schedules", list(SHAPES), "Mask schedules.")
_ITERATIONS = flags.DEFINE_list("iterations", ["2", "4", "6", "8", "12", "16",
                                               "24"], "Decoding iterations.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 3000,
                                    "Samples per seed and point.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per point.")
_CAS_STEPS = flags.DEFINE_integer(
    "cas_train_steps", 600, "Training steps of each CAS classifier (0: no "
    "CAS).")
_BATCH = flags.DEFINE_integer("eval_batch_size", 0,
                              "Generation batch (0: the run's).")
_NUM_REFERENCE = flags.DEFINE_integer(
    "num_reference", 0, "Real images for the reference and CAS's test set "
    "(0: the run's config.eval.num_reference).")
_OUT = flags.DEFINE_string(
    "out", os.path.join(REPO, "benchmarks", "results",
                        "schedule_experiment.json"), "Result JSON.")
_TABLE = flags.DEFINE_string("table", "", "Markdown table to write.")
_PLOT_DIR = flags.DEFINE_string("plot_dir", "", "Folder for the PNG plots.")


def eval_config(schedule: str, iterations: List[int]):
  """The transformer run's config, set up to sweep num_iter for one
  schedule with this experiment's sample counts."""
  from maskgit_jax import workdir as workdir_lib
  config = workdir_lib.Workdir(_WORKDIR.value).load_config()
  if _TOKENIZER.value:
    config.tokenizer_workdir = _TOKENIZER.value
  e = config.eval
  if _CLASSIFIER.value:
    e.feature_network, e.classifier = "classifier", _CLASSIFIER.value
    e.reference_cache_dir = os.path.join(os.path.dirname(
        os.path.abspath(_CLASSIFIER.value)), "reference")
  e.num_samples, e.seeds = _NUM_SAMPLES.value, _SEEDS.value
  if _BATCH.value:
    config.eval_batch_size = _BATCH.value
  if _NUM_REFERENCE.value:
    e.num_reference = _NUM_REFERENCE.value
  e.precision_recall_samples = min(int(e.precision_recall_samples),
                                   _NUM_SAMPLES.value)
  e.cas, e.cas_train_steps = _CAS_STEPS.value > 0, max(_CAS_STEPS.value, 1)
  config.mask_schedule = schedule
  e.sweep.num_iter = tuple(iterations)
  e.name = f"schedule_{schedule}"
  return config


def run_schedule(schedule: str, iterations: List[int]) -> Dict[str, Any]:
  """The eval job's report for one schedule (reused when already written
  with the same settings)."""
  from maskgit_jax import files
  from maskgit_jax import workdir as workdir_lib
  from maskgit_jax.evaluation import transformer_eval
  config = eval_config(schedule, iterations)
  path = workdir_lib.Workdir(_WORKDIR.value).eval_result(config.eval.name)
  want = {"num_samples": _NUM_SAMPLES.value, "seeds": _SEEDS.value,
          "cas_train_steps": _CAS_STEPS.value,
          "iterations": list(iterations)}
  if path.exists():
    report = json.loads(path.read_text())
    if report.get("experiment") == want:
      print(f"[schedules] {schedule}: reusing {path}", flush=True)
      return report
  start = time.time()
  report = transformer_eval.evaluate_transformer(config, _WORKDIR.value)
  report["experiment"] = want
  files.write_json(path, report)
  print(f"[schedules] {schedule}: {time.time() - start:.0f} s", flush=True)
  return report


def points(reports: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One row per (schedule, iterations) with mean and spread of each
  metric."""
  rows = []
  for schedule, report in reports.items():
    for result in report["results"]:
      row = {"schedule": schedule, "shape": SHAPES.get(schedule, "?"),
             "num_iter": result["settings"]["num_iter"]}
      row.update({k: v for k, v in result.items()
                  if k not in ("settings", "per_seed")})
      rows.append(row)
  return rows


def findings(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The paper's two claims, checked on the measured points."""
  by_schedule: Dict[str, List[Dict[str, Any]]] = {}
  for row in rows:
    by_schedule.setdefault(row["schedule"], []).append(row)
  out: Dict[str, Any] = {"best_num_iter": {}, "interior_optimum": {},
                         "mean_fid_by_shape": {}, "mean_cas_by_shape": {}}
  iterations = sorted({row["num_iter"] for row in rows})
  for schedule, group in by_schedule.items():
    best = min(group, key=lambda r: r["fid"])
    out["best_num_iter"][schedule] = {"num_iter": best["num_iter"],
                                      "fid": best["fid"]}
    out["interior_optimum"][schedule] = (
        iterations[0] < best["num_iter"] < iterations[-1])
  for shape in ("concave", "linear", "convex"):
    group = [r for r in rows if r["shape"] == shape]
    if group:
      out["mean_fid_by_shape"][shape] = sum(r["fid"] for r in group) / len(
          group)
      if all("cas" in r for r in group):
        out["mean_cas_by_shape"][shape] = sum(r["cas"] for r in group) / len(
            group)
  # Per iteration count: which shape holds the best FID.
  out["best_shape_per_num_iter"] = {
      str(n): min((r for r in rows if r["num_iter"] == n),
                  key=lambda r: r["fid"])["shape"] for n in iterations}
  return out


def markdown_table(rows: List[Dict[str, Any]], metric: str) -> str:
  """Schedules as rows, iteration counts as columns: `mean ± std`."""
  iterations = sorted({row["num_iter"] for row in rows})
  schedules = list(dict.fromkeys(row["schedule"] for row in rows))
  cell = {(r["schedule"], r["num_iter"]): r for r in rows}
  lines = ["| schedule (shape) | " + " | ".join(map(str, iterations)) + " |",
           "| --- |" + " --- |" * len(iterations)]
  for schedule in schedules:
    values = []
    for n in iterations:
      r = cell.get((schedule, n))
      values.append("" if r is None or metric not in r else
                    f"{r[metric]:.3g} ± {r[metric + '_std']:.2g}")
    lines.append(f"| {schedule} ({SHAPES.get(schedule, '?')}) | "
                 + " | ".join(values) + " |")
  return "\n".join(lines)


def report_header(summary: Dict[str, Any]) -> str:
  """The settings and the derived findings, above the tables."""
  f = summary["findings"]
  lines = [
      "# Mask schedule x decoding iterations", "",
      "Written by `benchmarks/schedule_experiment.py` on "
      f"{summary['date']} ({summary['seconds'] / 60:.0f} min): transformer "
      f"step {summary['step']}, {summary['num_samples']} class-balanced "
      f"samples x {summary['seeds']} seeds per point, choice temperature "
      f"{summary['choice_temperature']:g}, guidance scale "
      f"{summary['guidance_scale']:g}, features and FID in the "
      f"`{summary['feature_network']}` network's space; CAS trains the "
      f"small classifier for {summary['cas_train_steps']} steps on the "
      "samples and tests it on the real test split. Cells are mean ± "
      "standard deviation over seeds.", "",
      "Best iteration count per schedule (by FID): " + ", ".join(
          f"{s} {b['num_iter']} ({b['fid']:.3g})"
          for s, b in f["best_num_iter"].items()) + ".", "",
      "Mean FID over the iteration counts, by shape: " + ", ".join(
          f"{k} {v:.3g}" for k, v in f["mean_fid_by_shape"].items()) + ".",
      ""]
  if f["mean_cas_by_shape"]:
    lines += ["Mean CAS by shape: " + ", ".join(
        f"{k} {v:.3g}" for k, v in f["mean_cas_by_shape"].items()) + ".", ""]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from maskgit_jax import schedules as schedules_lib
  from maskgit_jax.evaluation import plot
  for schedule in _SCHEDULES.value:
    schedules_lib.validate(schedule)
  try:
    iterations = [int(n) for n in _ITERATIONS.value]
  except ValueError:
    sys.exit(f"--iterations must be whole numbers, got {_ITERATIONS.value}")
  if not iterations or min(iterations) < 1:
    sys.exit(f"--iterations must be >= 1, got {iterations}")
  if _NUM_SAMPLES.value < 10 or _SEEDS.value < 1:
    sys.exit(f"--num_samples must be >= 10 and --seeds >= 1, got "
             f"{_NUM_SAMPLES.value} and {_SEEDS.value}")

  start = time.time()
  reports = {s: run_schedule(s, iterations) for s in _SCHEDULES.value}
  rows = points(reports)
  summary = {
      "workdir": os.path.abspath(_WORKDIR.value),
      "step": next(iter(reports.values()))["step"],
      "feature_network": next(iter(reports.values()))["feature_network"],
      "num_samples": _NUM_SAMPLES.value, "seeds": _SEEDS.value,
      "cas_train_steps": _CAS_STEPS.value, "iterations": iterations,
      "choice_temperature": reports[_SCHEDULES.value[0]]["results"][0][
          "settings"]["choice_temperature"],
      "guidance_scale": reports[_SCHEDULES.value[0]]["results"][0][
          "settings"]["guidance_scale"],
      "points": rows, "findings": findings(rows),
      "date": time.strftime("%Y-%m-%d"),
      "seconds": round(time.time() - start, 1)}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary["findings"], indent=2))
  tables = {metric: markdown_table(rows, metric)
            for metric in ("fid", "cas", "classifier_accuracy", "precision",
                           "recall")
            if all(metric in r for r in rows)}
  for metric, table in tables.items():
    print(f"\n{metric}\n{table}")
  if _TABLE.value:
    with open(_TABLE.value, "w") as f:
      f.write(report_header(summary))
      for metric, table in tables.items():
        f.write(f"### {metric}\n\n{table}\n\n")
  if _PLOT_DIR.value:
    for metric in ("fid", "cas"):
      if metric not in tables:
        continue
      series = {s: ([r["num_iter"] for r in rows if r["schedule"] == s],
                    [r[metric] for r in rows if r["schedule"] == s])
                for s in _SCHEDULES.value}
      plot.multi_line_plot(
          series, os.path.join(_PLOT_DIR.value,
                               f"schedule_experiment_{metric}.png"),
          xlabel="decoding iterations",
          ylabel=f"{metric.upper()} ({summary['feature_network']})")
  print(f"[schedules] wrote {_OUT.value} in {summary['seconds']:.0f} s")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
