"""Forward-pass time of MaskGITTransformer: our fused attention vs flax's.

The reference variant swaps our `SelfAttention` for flax's
`nn.SelfAttention` laid out as the official model uses it (separate Q/K/V
projections, heads-last); everything else is identical. Each variant runs in
its own fresh process, alternating A/B several times, and the medians are
printed and saved as JSON.

  python benchmarks/transformer_forward.py --rounds 3 --out benchmarks/results/transformer_forward.json
"""

import argparse
import json
import os
import statistics

import harness

CONFIG = dict(codebook_size=1024, num_classes=1000, num_tokens=256,
              hidden_size=256, num_layers=8, num_heads=8, mlp_dim=1024)
BATCH = 8


def measure(variant: str, repeats: int) -> float:
  """Median wall time (ms) of one jitted forward, in this process."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from maskgit_jax.models import transformer

  if variant == "flax":
    class FlaxSelfAttention(nn.Module):
      num_heads: int
      dropout_rate: float = 0.0
      kernel_init: object = transformer.truncated_normal(0.02)
      dtype: object = jnp.float32

      @nn.compact
      def __call__(self, x, deterministic):
        return nn.SelfAttention(
            num_heads=self.num_heads, qkv_features=x.shape[-1],
            kernel_init=self.kernel_init, dropout_rate=self.dropout_rate,
            deterministic=deterministic)(x)
    transformer.SelfAttention = FlaxSelfAttention

  model = transformer.MaskGITTransformer(**CONFIG)
  tokens = jnp.zeros((BATCH, CONFIG["num_tokens"] + 1), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  forward = jax.jit(model.apply)
  return 1000 * harness.median_seconds(
      lambda: forward(params, tokens).block_until_ready(), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="benchmarks/results/transformer_forward.json")
  parser.add_argument("--worker", choices=["ours", "flax"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(measure(args.worker, args.repeats))
    return

  results = {"ours": [], "flax": []}
  for _ in range(args.rounds):
    for variant in results:
      results[variant].append(harness.run_worker(
          [__file__, "--worker", variant, "--repeats", str(args.repeats)]))
  import jax
  summary = {
      "benchmark": "transformer_forward", "config": CONFIG, "batch": BATCH,
      "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
      "ms_per_round": results,
      "median_ms": {k: statistics.median(v) for k, v in results.items()},
  }
  summary["speedup"] = summary["median_ms"]["flax"] / summary["median_ms"]["ours"]
  print(json.dumps(summary, indent=2))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
