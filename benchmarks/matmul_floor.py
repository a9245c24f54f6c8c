"""The matrix multiplies of one transformer train step, timed on their own.

A train step cannot run faster than its matmuls do on the same backend.
This builds every matmul of the step at the step's shapes (forward, the
input gradient and the weight gradient of each dense layer, the four
attention products of the backward pass, the tied logits head) on random
data, as independent `[batch / streams]` slices in one jitted program as
the trainer slices its batch (streams.py), and times it. Biases,
LayerNorm, GELU, softmax, dropout, the loss and the optimizer are left
out, so the time is a floor for the whole step: `train_throughput.py`
reports it beside the step, and the best examples/s any step built from
these matmuls could reach.

The FLOPs it counts are those of the matmuls it runs: 6 W B S + 12 L S^2 D B
with W the matmul weights (the analytic count's N less biases and
LayerNorm scales), plus the tied logits head over the image codes
(6 B S D codebook_size), which the analytic count leaves out.
"""

import math
from typing import Any, Callable, Dict, List, Tuple

Shape = Tuple[int, ...]


def _dense(rows: int, fan_in: int, fan_out: int) -> List[Tuple[str, Shape,
                                                              Shape]]:
  """y = x W, then dx = dy W^T and dW = x^T dy, as einsum specs."""
  return [("rk,kn->rn", (rows, fan_in), (fan_in, fan_out)),
          ("rn,kn->rk", (rows, fan_out), (fan_in, fan_out)),
          ("rk,rn->kn", (rows, fan_in), (rows, fan_out))]


def _attention(batch: int, heads: int, seq: int, head_dim: int
               ) -> List[Tuple[str, Shape, Shape]]:
  """Scores and weighted values, and the four products of their gradient,
  in the model's heads-first layout."""
  vectors = (batch, heads, seq, head_dim)
  square = (batch, heads, seq, seq)
  return [("bnqd,bnkd->bnqk", vectors, vectors),   # scores = Q K^T
          ("bnqk,bnkd->bnqd", square, vectors),    # context = P V
          ("bnqk,bnkd->bnqd", square, vectors),    # dQ = dS K
          ("bnqk,bnqd->bnkd", square, vectors),    # dK = dS^T Q
          ("bnqd,bnkd->bnqk", vectors, vectors),   # dP = dC V^T
          ("bnqk,bnqd->bnkd", square, vectors)]    # dV = P^T dC


def step_matmuls(batch: int, seq_len: int, hidden: int, mlp_dim: int,
                 num_layers: int, num_heads: int, codebook_size: int
                 ) -> List[Tuple[str, Shape, Shape]]:
  """Every matmul of one forward + backward pass over `batch` examples."""
  rows = batch * seq_len
  per_layer = (_dense(rows, hidden, 3 * hidden) +      # fused QKV
               _attention(batch, num_heads, seq_len, hidden // num_heads) +
               _dense(rows, hidden, hidden) +          # attention output
               _dense(rows, hidden, mlp_dim) + _dense(rows, mlp_dim, hidden))
  head = _dense(rows, hidden, hidden) + _dense(rows, hidden, codebook_size)
  return per_layer * num_layers + head


def flops(matmuls: List[Tuple[str, Shape, Shape]]) -> float:
  """2 x multiply-adds of each einsum (every index appears in an operand)."""
  total = 0.0
  for spec, lhs_shape, rhs_shape in matmuls:
    inputs, _ = spec.split("->")
    sizes = {}
    for names, shape in zip(inputs.split(","), (lhs_shape, rhs_shape)):
      sizes.update(zip(names, shape))
    total += 2.0 * math.prod(sizes.values())
  return total


def build(batch: int, streams: int, **sizes) -> Tuple[Callable, Any, float]:
  """(jitted fn, its operands, FLOPs per call) for `streams` slices of
  `batch / streams` examples each.

  Each slice's products run one after another, as the step's data
  dependencies make them (a layer waits for the one before it), while the
  slices run side by side.
  """
  import jax
  import jax.numpy as jnp
  if batch % streams:
    raise ValueError(f"batch {batch} is not divisible into {streams} "
                     "streams.")
  matmuls = step_matmuls(batch // streams, **sizes)
  keys = iter(jax.random.split(jax.random.key(0), 2 * len(matmuls) * streams))
  operands = [[(jax.random.normal(next(keys), lhs, jnp.float32),
                jax.random.normal(next(keys), rhs, jnp.float32))
               for _, lhs, rhs in matmuls] for _ in range(streams)]
  specs = [spec for spec, _, _ in matmuls]

  @jax.jit
  def run(operands):
    outputs = []
    for stream in operands:
      previous = jnp.zeros(())
      for spec, (lhs, rhs) in zip(specs, stream):
        # The next product starts once this one is done.
        previous, lhs, rhs = jax.lax.optimization_barrier(
            (previous, lhs, rhs))
        previous = jnp.einsum(spec, lhs, rhs)
        outputs.append(previous)
    return outputs
  return run, operands, streams * flops(matmuls)


def measure(batch: int, streams: int, repeats: int, **sizes
            ) -> Dict[str, Any]:
  """Median seconds of one step's matmuls, and their FLOPs."""
  import jax
  import harness
  run, operands, total = build(batch, streams, **sizes)
  seconds = harness.median_seconds(
      lambda: jax.block_until_ready(run(operands)), repeats)
  return {"seconds_per_step": seconds, "flops_per_step": total,
          "flops_per_s": total / seconds, "streams": streams}
