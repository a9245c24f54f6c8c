r"""Pipeline.from_official(...).generate against the official decoding loop.

Both sides sample class-conditional images, tokens and pixels, from the same
official-format checkpoints (flax msgpack files written by the official
modules): 8 images, 8 iterations, choice temperature 4.5, cosine schedule,
float32. The official side is `generate_samples` of the official
`inference.py` (its `parallel_decode.decode`, then the tokenizer's
`decode_from_indices`), jitted. Each side runs in its own fresh process; the
two alternate for several rounds, and the medians are printed and saved.

The official code is not part of this project: pass a checkout of
github.com/google-research/maskgit (the folder that holds `maskgit/`).

  python benchmarks/official_decode.py --official_dir=/tmp/official \
      --rounds=3 --out=benchmarks/results/official_decode.json

Transformer: 8 layers, hidden 256, 8 heads, MLP 1024, 16x16 tokens, codebook
1024, 1000 classes. Tokenizer (`--tokenizer_filters`, default 32): the
official ImageNet-256 layout (channel multipliers 1,1,2,2,4, two residual
blocks, 256x256 pixels) with that many base filters; 128 is the released
tokenizer's full size.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

import harness

BATCH, NUM_ITER, CHOICE_TEMPERATURE = 8, 8, 4.5
CODEBOOK, CLASSES, SIDE = 1024, 1000, 16
TRANSFORMER = dict(hidden_size=256, num_hidden_layers=8,
                   num_attention_heads=8, intermediate_size=1024)


def _official_modules(official_dir: str, filters: int):
  """The official transformer and tokenizer modules at the benchmark sizes."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  jnp.DeviceArray = jax.Array  # The official code predates its removal.
  sys.path.insert(0, official_dir)
  from maskgit.nets import maskgit_transformer
  from maskgit.nets import vqgan_tokenizer
  transformer = maskgit_transformer.Transformer(
      vocab_size=CODEBOOK + CLASSES + 1,
      max_position_embeddings=SIDE * SIDE + 1, **TRANSFORMER)
  config = ml_collections.ConfigDict({"vqvae": dict(
      quantizer="vq", codebook_size=CODEBOOK, entropy_loss_ratio=0.1,
      entropy_temperature=0.01, entropy_loss_type="softmax",
      commitment_cost=0.25, filters=filters, num_res_blocks=2,
      channel_multipliers=[1, 1, 2, 2, 4], embedding_dim=256,
      conv_downsample=False, activation_fn="swish", norm_type="GN")})
  tokenizer = vqgan_tokenizer.VQVAE(config=config, train=False)
  return transformer, tokenizer


def write_checkpoints(official_dir: str, filters: int, out_dir: str) -> None:
  """Random official-format checkpoints, initialised by the official code."""
  import flax
  import jax
  import jax.numpy as jnp
  transformer, tokenizer = _official_modules(official_dir, filters)
  tokens = jnp.zeros((1, SIDE * SIDE + 1), jnp.int32)
  t_vars = transformer.init(jax.random.key(0), tokens, deterministic=True)
  image = jnp.zeros((1, SIDE * 16, SIDE * 16, 3))
  k_vars = tokenizer.init(
      jax.random.key(1), image,
      method=lambda m, x: m.decode(m.encode({"image": x})[0]))
  for name, tree in (("transformer", t_vars), ("tokenizer", k_vars)):
    with open(os.path.join(out_dir, f"{name}.msgpack"), "wb") as f:
      f.write(flax.serialization.to_bytes(jax.device_get(tree)))


def _inputs():
  import numpy as np
  inputs = np.full((BATCH, SIDE * SIDE + 1), -1, np.int32)
  inputs[:, 0] = CODEBOOK + np.arange(BATCH) * 97  # class tokens
  return inputs


def measure_official(official_dir, filters, ckpt_dir, repeats) -> float:
  import flax
  import jax
  import numpy as np
  transformer, tokenizer = _official_modules(official_dir, filters)
  from maskgit.libml import parallel_decode
  load = lambda name: flax.serialization.msgpack_restore(
      open(os.path.join(ckpt_dir, f"{name}.msgpack"), "rb").read())
  t_vars, k_vars = load("transformer"), load("tokenizer")

  @jax.jit
  def generate_samples(t_vars, k_vars, input_tokens, rng):
    # As in the official inference.py.
    def tokens_to_logits(seq):
      logits = transformer.apply(t_vars, seq, deterministic=True)
      return logits[..., :CODEBOOK]
    output = parallel_decode.decode(
        input_tokens, rng, tokens_to_logits, num_iter=NUM_ITER,
        choice_temperature=CHOICE_TEMPERATURE, mask_token_id=-1)
    output = output[:, -1, 1:].reshape(-1, SIDE, SIDE)
    return tokenizer.apply(k_vars, output,
                           method=tokenizer.decode_from_indices)

  inputs, rng = jax.numpy.asarray(_inputs()), jax.random.key(0)
  return harness.median_seconds(
      lambda: np.asarray(generate_samples(t_vars, k_vars, inputs, rng)),
      repeats)


def measure_ours(ckpt_dir, repeats) -> float:
  from maskgit_jax import Pipeline
  pipe = Pipeline.from_official(
      tokenizer=os.path.join(ckpt_dir, "tokenizer.msgpack"),
      transformer=os.path.join(ckpt_dir, "transformer.msgpack"))
  classes = (_inputs()[:, 0] - CODEBOOK).tolist()
  return harness.median_seconds(
      lambda: pipe.generate(classes, seed=0, num_iter=NUM_ITER,
                            choice_temperature=CHOICE_TEMPERATURE), repeats)


def run_child(args, side: str) -> float:
  return harness.run_worker([
      os.path.abspath(__file__), f"--child={side}",
      f"--official_dir={args.official_dir}",
      f"--tokenizer_filters={args.tokenizer_filters}",
      f"--checkpoint_dir={args.checkpoint_dir}", f"--repeats={args.repeats}"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official_dir", required=True,
                      help="checkout of google-research/maskgit")
  parser.add_argument("--tokenizer_filters", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--checkpoint_dir", default=None,
                      help="where to write the checkpoints (default: temp)")
  parser.add_argument("--out", default=None, help="JSON file for results")
  parser.add_argument("--child", choices=("official", "ours"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.official_dir, "maskgit",
                                     "libml", "parallel_decode.py")):
    raise SystemExit(f"--official_dir={args.official_dir!r} does not hold "
                     "maskgit/libml/parallel_decode.py; pass a checkout of "
                     "github.com/google-research/maskgit.")
  if args.child == "official":
    print(measure_official(args.official_dir, args.tokenizer_filters,
                           args.checkpoint_dir, args.repeats))
    return
  if args.child == "ours":
    print(measure_ours(args.checkpoint_dir, args.repeats))
    return

  with tempfile.TemporaryDirectory() as scratch:
    args.checkpoint_dir = args.checkpoint_dir or scratch
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    write_checkpoints(args.official_dir, args.tokenizer_filters,
                      args.checkpoint_dir)
    times = {"official": [], "ours": []}
    for round_index in range(args.rounds):
      for side in ("official", "ours"):
        times[side].append(run_child(args, side))
        print(f"round {round_index + 1}: {side} {times[side][-1]:.3f} s",
              flush=True)
  medians = {side: statistics.median(t) for side, t in times.items()}
  result = {
      "benchmark": "official_decode", "batch": BATCH, "num_iter": NUM_ITER,
      "transformer": TRANSFORMER, "tokens": f"{SIDE}x{SIDE}",
      "codebook_size": CODEBOOK, "tokenizer_filters": args.tokenizer_filters,
      "rounds": args.rounds, "repeats": args.repeats,
      "seconds": times, "median_seconds": medians,
      "speedup": medians["official"] / medians["ours"],
      "cpu_count": os.cpu_count(),
  }
  print(json.dumps({k: result[k] for k in ("median_seconds", "speedup")}))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
