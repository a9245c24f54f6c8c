r"""Sampling throughput and FLOP utilisation of `Pipeline.generate`.

Class-conditional images, tokens and pixels, from random weights at a
transformer config's sizes and sampling settings (config.sampling:
num_iter, guidance_scale, choice_temperature; config.mask_schedule), in
float32 as every Pipeline runs. The tokenizer is the config's own: the
config of --tokenizer_config, else the one saved in config.tokenizer_workdir,
else configs/vqgan_<name>.py beside the given maskgit_<name>.py (same
variant). The random pipeline claims an unconditional model, so a config
with guidance samples with guidance, as its trained model would.

Each round is a fresh worker process (harness.FIXED_MALLOC): it compiles
with one untimed call, takes the median of --repeats calls, then measures
the machine's float32 matmul peak (harness.peak_matmul) in the same process
(with --nominal_peak the record adds the MFU against that datasheet
figure).

FLOPs counted per call: the transformer analytically, 2 N B S + 4 L S^2 D B
per forward pass (N = parameters other than the token and position
embeddings, so the logits head is not counted; S = num_tokens + 1), times
num_iter, with B doubled under guidance (conditional and unconditional
halves in one pass); plus the pixel decoder, from XLA's cost analysis of
the compiled decoder. XLA's count of the transformer forward (head
included) is given beside the analytic one; XLA's count of the whole
sampling program is not used, since it counts the decoding loop's body once.

  python benchmarks/sample_throughput.py \
      --config=configs/maskgit_fashion_mnist.py --batch_size=8 \
      --out=benchmarks/results/sample_throughput_fashion_mnist.json
  python benchmarks/sample_throughput.py \
      --config=configs/maskgit_imagenet256.py --batch_size=8 --rounds=1
"""

import argparse
import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional, Tuple

import harness

EMBEDDINGS = ("token_embedding", "position_embedding")


def tokenizer_config(config, config_spec: str,
                     tokenizer_spec: Optional[str]) -> Tuple[Any, str]:
  """(the tokenizer's config, where it came from); see the docstring."""
  if tokenizer_spec:
    return harness.load_config(tokenizer_spec), tokenizer_spec
  from maskgit_jax import workdir as workdir_lib
  if config.get("tokenizer_workdir"):
    run = workdir_lib.Workdir(config.tokenizer_workdir)
    if run.config_file.exists():
      return run.load_config(), os.fspath(run.config_file)
  path, colon, variant = config_spec.partition(":")
  folder, name = os.path.split(path)
  if name.startswith("maskgit_"):
    sibling = os.path.join(folder, "vqgan_" + name[len("maskgit_"):])
    if os.path.isfile(sibling):
      spec = sibling + colon + variant
      return harness.load_config(spec), spec
  raise ValueError(f"No tokenizer config for {config_spec!r}: "
                   f"config.tokenizer_workdir={config.tokenizer_workdir!r} "
                   "holds no config.json and there is no vqgan_*.py beside "
                   "it; pass --tokenizer_config=configs/vqgan_....py.")


def build_pipeline(config, k_config, num_tokens: Optional[int], seed: int):
  """A Pipeline of the two configs' modules with random weights."""
  import jax
  import jax.numpy as jnp
  from maskgit_jax import Pipeline
  from maskgit_jax.models import build
  tokenizer = build.tokenizer(k_config, dtype="float32")
  factor = tokenizer.downsample_factor
  if num_tokens is None:
    side = k_config.data.image_size // factor
  else:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
      raise ValueError(f"--num_tokens={num_tokens} is not a square grid.")
  transformer = build.transformer(config, tokenizer.codebook_size,
                                  side * side, dtype="float32")
  k_rng, t_rng = jax.random.split(jax.random.key(seed))
  pixels = side * factor
  k_params = jax.jit(tokenizer.init)(
      k_rng, jnp.zeros((1, pixels, pixels, 3), jnp.float32))["params"]
  t_params = jax.jit(transformer.init)(
      t_rng, jnp.zeros((1, transformer.seq_len), jnp.int32))["params"]
  return Pipeline(tokenizer, k_params, transformer, t_params,
                  token_shape=(side, side), mask_schedule=config.mask_schedule,
                  has_unconditional=True)


def count_flops(pipe, batch: int, num_iter: int, guided: bool
                ) -> Dict[str, float]:
  """Per-call FLOPs: analytic transformer, XLA transformer, XLA decoder."""
  import jax.numpy as jnp
  from maskgit_jax import pipeline as pipeline_lib
  model = pipe.transformer
  rows = 2 * batch if guided else batch
  non_embedding = harness.count_params(pipe.transformer_params, EMBEDDINGS)
  forward = harness.transformer_flops(non_embedding, rows, model.seq_len,
                                      model.num_layers, model.hidden_size,
                                      training=False)
  tokens = jnp.zeros((rows, model.seq_len), jnp.int32)
  xla_forward = harness.xla_flops(pipeline_lib.transformer_logits.lower(
      model, pipe.transformer_params, tokens).compile())
  indices = jnp.zeros((batch,) + pipe.token_shape, jnp.int32)
  decoder = harness.xla_flops(pipeline_lib.detokenize_indices.lower(
      pipe.tokenizer, pipe.tokenizer_params, indices).compile())
  return {"non_embedding_params": non_embedding,
          "transformer_forwards_per_call": num_iter,
          "transformer_rows_per_forward": rows,
          "transformer_flops_per_call": num_iter * forward,
          "xla_transformer_flops_per_call": num_iter * xla_forward,
          "decoder_flops_per_call": decoder}


def measure(args) -> Dict[str, Any]:
  """One worker's report: seconds per call, FLOPs, peak, sizes, machine."""
  import numpy as np
  config = harness.load_config(args.config, args.set)
  if config.stage != "transformer":
    raise ValueError(f"--config={args.config!r} is a {config.stage} config; "
                     "sampling needs a transformer config.")
  k_config, k_source = tokenizer_config(config, args.config,
                                        args.tokenizer_config)
  pipe = build_pipeline(config, k_config, args.num_tokens, config.seed)
  s = config.sampling
  classes = (np.arange(args.batch_size) % pipe.num_classes).tolist()
  settings = dict(num_iter=int(s.num_iter),
                  choice_temperature=float(s.choice_temperature),
                  guidance_scale=float(s.guidance_scale))
  seconds = harness.median_seconds(
      lambda: pipe.generate(classes, seed=0, **settings), args.repeats)
  side = pipe.token_shape[0]
  report = {"tokenizer_config": k_source,
            "codebook_size": pipe.codebook_size,
            "num_tokens": pipe.transformer.num_tokens,
            "token_shape": list(pipe.token_shape),
            "image_size": side * pipe.tokenizer.downsample_factor,
            "mask_schedule": pipe.mask_schedule,
            "transformer": config.transformer.to_dict(),
            "sampling": settings, "seconds_per_call": seconds}
  report.update(count_flops(pipe, args.batch_size, settings["num_iter"],
                            settings["guidance_scale"] > 0))
  report["peak"] = harness.peak_matmul(harness.peak_sizes(args.peak_sizes),
                                       args.peak_repeats)
  report["machine"] = harness.machine_info()
  return report


def summarize(args, rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The JSON record: medians over rounds, FLOPs, utilisation, provenance."""
  first = rounds[0]
  seconds = statistics.median(r["seconds_per_call"] for r in rounds)
  model_flops = (first["transformer_flops_per_call"] +
                 first["decoder_flops_per_call"])
  peak = max((r["peak"] for r in rounds), key=lambda p: p["flops_per_s"])
  achieved = model_flops / seconds
  result = {
      "benchmark": "sample_throughput", "config": args.config,
      "overrides": list(args.set), "batch_size": args.batch_size,
      "dtype": "float32", "rounds": args.rounds, "repeats": args.repeats,
      **{k: first[k] for k in (
          "tokenizer_config", "codebook_size", "num_tokens", "token_shape",
          "image_size", "mask_schedule", "transformer", "sampling")},
      "seconds_per_call_by_round": [r["seconds_per_call"] for r in rounds],
      "seconds_per_call": seconds,
      "images_per_s": args.batch_size / seconds,
      "tokens_per_s": args.batch_size * first["num_tokens"] / seconds,
      "tokens_counted": "image tokens generated (num_tokens per image)",
      **{k: first[k] for k in (
          "non_embedding_params", "transformer_forwards_per_call",
          "transformer_rows_per_forward", "transformer_flops_per_call",
          "xla_transformer_flops_per_call", "decoder_flops_per_call")},
      "model_flops_per_call": model_flops,
      "flops_counted": (
          "transformer forwards, analytic 2*N*B*S + 4*L*S^2*D*B each (N = "
          "non-embedding parameters, the logits head not counted), x "
          "num_iter, B doubled with guidance; plus the pixel decoder "
          "(included, XLA cost analysis); the decoding loop's sampling ops "
          "are not counted"),
      "flops_source": "analytic transformer + xla_cost_analysis decoder",
      "xla_flops_per_call": (first["xla_transformer_flops_per_call"] +
                             first["decoder_flops_per_call"]),
      "achieved_flops_per_s": achieved,
      **harness.utilization(achieved, peak, first["machine"]["device_kind"],
                            args.nominal_peak),
      "machine": first["machine"], "date": harness.now(),
      **harness.git_commit(),
  }
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="transformer config file[:variant]")
  parser.add_argument("--set", action="append", default=[],
                      metavar="KEY.PATH=VALUE",
                      help="config override, repeatable: "
                      "--set sampling.num_iter=8")
  parser.add_argument("--tokenizer_config", default=None,
                      help="tokenizer config file[:variant] (default: see "
                      "the module docstring)")
  parser.add_argument("--num_tokens", type=int, default=None,
                      help="image tokens (a square grid); default the "
                      "tokenizer config's image size / downsampling")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="images per generate call")
  harness.add_common_flags(
      parser, repeats_help="timed calls per worker (the median counts)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  harness.require_positive(
      parser, args, ("batch_size", "rounds", "repeats", "peak_repeats"))
  return args


def _worker_args(args) -> List[str]:
  argv = [os.path.abspath(__file__), "--child", f"--config={args.config}",
          f"--batch_size={args.batch_size}", f"--repeats={args.repeats}",
          f"--peak_sizes={args.peak_sizes}",
          f"--peak_repeats={args.peak_repeats}"]
  argv += [f"--set={text}" for text in args.set]
  for name in ("tokenizer_config", "num_tokens"):
    if getattr(args, name) is not None:
      argv.append(f"--{name}={getattr(args, name)}")
  return argv


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    try:
      print(json.dumps(measure(args)))
    except ValueError as error:
      raise SystemExit(f"Error: {error}") from None
    return
  rounds = []
  for round_index in range(args.rounds):
    rounds.append(harness.run_worker_json(_worker_args(args)))
    print(f"round {round_index + 1}: {rounds[-1]['seconds_per_call']:.4f} "
          "s/call", flush=True)
  result = summarize(args, rounds)
  shown = ("images_per_s", "tokens_per_s", "flop_utilization", "mfu")
  print(json.dumps({k: result[k] for k in shown
                    if result.get(k) is not None}))
  harness.write_json(args.out, result)


if __name__ == "__main__":
  main()
