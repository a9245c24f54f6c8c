r"""Train-step throughput and FLOP utilisation of a config, beside the peer.

The step is the trainer's own (`step_functions` of the config's stage),
jitted with the state donated, on random data of the config's batch shape:
int32 tokens and labels for a transformer, float images in [0, 1) for a
tokenizer (its LPIPS weights, when the config uses them, are the step's
constants). Each round is a fresh worker process (harness.FIXED_MALLOC);
a worker compiles, runs one untimed repeat, then times `--repeats` repeats
of `--steps` steps and takes the median. In the same process it measures
the machine's matmul peak in the step's dtype (harness.peak_matmul),
against which flop_utilization is given; for bfloat16 on an accelerator
with a datasheet peak (or --nominal_peak) the record adds the MFU.

Transformer FLOPs are analytic: 6 N B S + 12 L S^2 D B per step, N the
parameters other than the token and position embeddings (so the tied
logits head is not counted), S = num_tokens + 1. XLA's own count of the
compiled step is reported beside it. A tokenizer's FLOPs are XLA's count
(flops_source says which); a GAN config is timed from
losses.discriminator_start_step on, so the discriminator update that XLA
counts also runs.

The benchmark runs in float32 (`--set dtype=bfloat16` overrides that, and
the peak is then measured with bfloat16 matmuls). Sizes: `--set
key.path=value` (repeatable) on top of `--config=file.py[:variant]`; a
transformer's token grid comes from --codebook_size / --num_tokens, else as
`maskgit_jax.tools.plan` finds it.

With --peer_dir (a checkout of github.com/llvictorll/MaskGIT-pytorch; its
code is read from there, never copied), rounds alternate ours / the peer's
training step at the same sizes: its `Network/transformer.py`
MaskTransformer, driven by a loop that replicates `train_one_epoch` of its
`Trainer/vit.py` (CPU, float32, --peer_threads torch threads). The ratio
of examples/s is printed and saved, with what differs in "peer_notes".

A transformer worker also times the step's matrix multiplies alone
(`matmul_floor.py`: the same shapes and batch slices, nothing else) and
saves them as "matmul_floor": the floor's seconds and examples/s, the
step's time over it, and with a peer the floor's examples/s over the
peer's, the most any step built on these matmuls could reach.

The peer's sizes from the issue (4 layers and 8x8 tokens; 8 layers and
16x16 tokens):

  python benchmarks/train_throughput.py \
      --config=configs/maskgit_fashion_mnist.py --set batch_size=32 \
      --set transformer.hidden_size=256 --set transformer.num_heads=8 \
      --set transformer.mlp_dim=1024 --codebook_size=512 --num_tokens=64 \
      --peer_dir=/tmp/MaskGIT-pytorch \
      --out=benchmarks/results/train_throughput_8x8.json
  python benchmarks/train_throughput.py \
      --config=configs/maskgit_fashion_mnist.py --set batch_size=8 \
      --set transformer.num_layers=8 --set transformer.hidden_size=256 \
      --set transformer.num_heads=8 --set transformer.mlp_dim=1024 \
      --codebook_size=1024 --num_tokens=256 \
      --peer_dir=/tmp/MaskGIT-pytorch \
      --out=benchmarks/results/train_throughput_16x16.json
  python benchmarks/train_throughput.py \
      --config=configs/vqgan_fashion_mnist.py --out=/tmp/vqgan.json
"""

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List

import harness

PEER_REPO = "github.com/llvictorll/MaskGIT-pytorch"
# What the peer's Trainer/vit.py hard-codes for the transformer's training.
PEER_TRAINING = dict(learning_rate=1e-4, betas=(0.9, 0.96), weight_decay=1e-5,
                     label_smoothing=0.1, grad_clip_norm=1.0)
EMBEDDINGS = ("token_embedding", "position_embedding")


# --- ours ---------------------------------------------------------------------


def _stage(config, args) -> Dict[str, Any]:
  """The config's step functions and constants, and what sizes they have."""
  from maskgit_jax.train import tokenizer_stage
  from maskgit_jax.train import transformer_stage
  from maskgit_jax.tools import plan
  if config.stage == "transformer":
    if config.tokenizer_workdir:
      transformer_stage.validate(config)
    codes, tokens, source = plan.token_grid(config, args.codebook_size,
                                            args.num_tokens)
    init_fn, step_fn, shapes = transformer_stage.step_functions(
        config, codes, tokens)
    return dict(init_fn=init_fn, step_fn=step_fn, shapes=shapes,
                constants=None, codebook_size=codes, num_tokens=tokens,
                tokens_source=source)
  if config.stage == "tokenizer":
    if args.codebook_size is not None or args.num_tokens is not None:
      raise ValueError("--codebook_size and --num_tokens apply to transformer "
                       "configs; a tokenizer config sets config.vqgan.")
    tokenizer_stage.validate(config)
    init_fn, step_fn, shapes = tokenizer_stage.step_functions(config)
    constants = None
    if config.losses.perceptual_weight > 0:
      from maskgit_jax.models import perceptual
      constants = perceptual.load_lpips_params()
    factor = 2**(len(config.vqgan.channel_multipliers) - 1)
    return dict(init_fn=init_fn, step_fn=step_fn, shapes=shapes,
                constants=constants, codebook_size=config.vqgan.codebook_size,
                num_tokens=(config.data.image_size // factor)**2,
                tokens_source="config.vqgan and config.data.image_size")
  raise ValueError(f"config.stage={config.stage!r}; valid: 'tokenizer', "
                   "'transformer'.")


def random_batch(shapes, high: Dict[str, int], seed: int = 0):
  """A device batch of `shapes`: ints uniform in [0, high[key]), floats in
  [0, 1). Fixed for the run: only its shape matters to the step's time."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  batch = {}
  for key, shape in shapes.items():
    if np.issubdtype(shape.dtype, np.integer):
      batch[key] = rng.integers(0, high.get(key, 1), shape.shape)
    else:
      batch[key] = rng.random(shape.shape, np.float32)
    batch[key] = batch[key].astype(shape.dtype)
  return jax.device_put(batch)


def _timed_steps(compiled, state, batch, constants, steps: int, repeats: int
                 ) -> float:
  """Median seconds per step over `repeats` runs of `steps` donated steps."""
  import jax
  carry = [state]

  def run():
    current = carry[0]
    for _ in range(steps):
      current, metrics = compiled(current, batch, constants)
    jax.block_until_ready((current, metrics))
    carry[0] = current
  return harness.median_seconds(run, repeats) / steps


def measure_ours(args) -> Dict[str, Any]:
  """One worker's report: seconds per step, FLOPs, peak, sizes, machine."""
  import time
  import jax
  import jax.numpy as jnp
  config = harness.load_config(args.config, ["dtype=float32", *args.set])
  stage = _stage(config, args)
  state = jax.jit(stage["init_fn"])(jax.random.key(config.seed))
  report = {"stage": config.stage, "batch_size": config.batch_size,
            "dtype": config.dtype, "codebook_size": stage["codebook_size"],
            "num_tokens": stage["num_tokens"],
            "tokens_source": stage["tokens_source"]}
  if config.stage == "tokenizer" and _uses_gan(config):
    start = int(config.losses.discriminator_start_step)
    state["generator"] = state["generator"].replace(
        step=jnp.asarray(start, jnp.int32))
    report["timed_from_step"] = start
  high = {"tokens": stage["codebook_size"],
          "label": int(config.get("num_classes", 1))}
  batch = random_batch(stage["shapes"], high, config.seed)
  constants = (None if stage["constants"] is None
               else jax.device_put(stage["constants"]))

  jitted = jax.jit(stage["step_fn"], donate_argnums=0)
  start_time = time.perf_counter()
  compiled = jitted.lower(state, batch, constants).compile()
  report["compile_seconds"] = time.perf_counter() - start_time
  report["xla_flops_per_step"] = harness.xla_flops(compiled)
  if config.grad_accum_steps > 1:
    report["xla_flops_note"] = (
        f"XLA counts the scan over {config.grad_accum_steps} micro-batches "
        "once: its figure is about one micro-batch's step")
  if config.stage == "transformer":
    t = config.transformer
    params = state.params
    report["non_embedding_params"] = harness.count_params(params, EMBEDDINGS)
    report["model"] = t.to_dict()
    report["model_flops_per_step"] = harness.transformer_flops(
        report["non_embedding_params"], config.batch_size,
        stage["num_tokens"] + 1, t.num_layers, t.hidden_size, training=True)
    report["flops_source"] = ("analytic: 6*N*B*S + 12*L*S^2*D*B, N = "
                              "parameters other than token_embedding and "
                              "position_embedding, S = num_tokens + 1")
  else:
    report["model"] = {"vqgan": config.vqgan.to_dict(),
                       "losses": config.losses.to_dict()}
    report["model_flops_per_step"] = report["xla_flops_per_step"]
    report["flops_source"] = "xla_cost_analysis"
  report["seconds_per_step"] = _timed_steps(
      compiled, state, batch, constants, args.steps, args.repeats)
  if config.stage == "transformer":
    floor = _matmul_floor(config, stage, args.repeats)
    if floor:
      report["matmul_floor"] = floor
  report["peak"] = harness.peak_matmul(harness.peak_sizes(args.peak_sizes),
                                       args.peak_repeats, config.dtype)
  report["machine"] = harness.machine_info()
  return report


def _matmul_floor(config, stage, repeats: int):
  """The step's matmuls alone (matmul_floor.py), in the step's slices; None
  where they would not be the step's (bfloat16, accumulated micro-batches)."""
  import matmul_floor
  from maskgit_jax.train import transformer_stage
  if config.dtype != "float32" or config.grad_accum_steps > 1:
    return None
  t = config.transformer
  return matmul_floor.measure(
      config.batch_size, transformer_stage.train_streams(config.batch_size),
      repeats, seq_len=stage["num_tokens"] + 1, hidden=t.hidden_size,
      mlp_dim=t.mlp_dim, num_layers=t.num_layers, num_heads=t.num_heads,
      codebook_size=stage["codebook_size"])


def _uses_gan(config) -> bool:
  from maskgit_jax.train import tokenizer_stage
  return tokenizer_stage.uses_gan(config)


# --- the peer -----------------------------------------------------------------


def peer_spec(ours: Dict[str, Any], config) -> Dict[str, Any]:
  """The sizes the peer runs at: our transformer's, from a worker report."""
  side = math.isqrt(ours["num_tokens"])
  if side * side != ours["num_tokens"]:
    raise SystemExit(f"num_tokens={ours['num_tokens']} is not a square grid; "
                     "the peer's MaskTransformer needs side x side tokens.")
  t = ours["model"]
  return {"batch_size": ours["batch_size"], "side": side,
          "codebook_size": ours["codebook_size"],
          "num_classes": int(config["num_classes"]),
          "hidden_size": t["hidden_size"], "num_layers": t["num_layers"],
          "num_heads": t["num_heads"], "mlp_dim": t["mlp_dim"],
          "dropout_rate": t["dropout_rate"],
          "label_dropout": float(config["label_dropout"])}


def peer_notes(config, ours: Dict[str, Any], threads: int) -> List[str]:
  """What differs between the two timed steps, beyond framework and code."""
  t, opt = config.transformer, config.optimizer
  notes = [
      "Sizes: the peer's MaskTransformer(img_size=16*side, hidden_dim, "
      "codebook_size, depth, heads, mlp_dim, dropout, nclass) gets ours; its "
      "grid side is img_size // 16 (so 128 -> 8x8, 256 -> 16x16).",
      "Architecture: the peer is pre-LN with an extra input block (2 Linear, "
      "2 LayerNorm) and a per-position output bias [S, V], exact GELU; ours "
      "is post-LN (the official layout), one head Dense, a bias [V], tanh "
      "GELU. Each side's FLOPs count its own non-embedding parameters.",
      "Head and loss: the peer's logits cover codebook + nclass + 2 entries "
      "and its cross-entropy every image position over codebook + 1 "
      "classes; ours covers codebook + nclass + 1 entries, the loss only the "
      "masked positions over the codebook.",
      "Masking: the peer hides each token with probability arccos(r)/(pi/2) "
      "(its default 'arccos' mode, mask value = codebook_size); ours hides "
      f"exactly ceil(gamma(r) N) tokens, gamma = {config.mask_schedule}.",
      f"Optimizer: the peer's AdamW (lr {PEER_TRAINING['learning_rate']}, "
      f"betas {PEER_TRAINING['betas']}, weight decay "
      f"{PEER_TRAINING['weight_decay']} on every parameter, constant lr); "
      f"ours {opt.name} (lr {opt.learning_rate}, betas ({opt.b1}, {opt.b2}), "
      f"weight decay {opt.weight_decay} on kernels and embeddings, "
      f"{opt.schedule} schedule). Both clip the global norm: peer "
      f"{PEER_TRAINING['grad_clip_norm']}, ours {opt.grad_clip_norm}.",
      f"EMA: ours also updates an EMA of the parameters every step "
      f"(ema_decay {config.ema_decay}); the peer keeps none.",
      "Precision: vit.py wraps the step in torch.cuda.amp autocast and a "
      "GradScaler, CUDA-only; on CPU in float32 they do nothing, so the "
      "replicated step omits them.",
      "Tokens: the peer's loop encodes images with its VQGAN every step; "
      "both sides here start from tokens (ours trains on a token cache).",
      f"Threads: the peer runs {threads} torch threads; XLA:CPU uses every "
      f"core ({ours['machine']['cpu_count']} here).",
  ]
  if t.attention_dropout_rate != t.dropout_rate:
    notes.append(f"Dropout: the peer has one rate ({t.dropout_rate}) for "
                 "every dropout, attention included; ours uses "
                 f"attention_dropout_rate={t.attention_dropout_rate}.")
  if config.label_smoothing != PEER_TRAINING["label_smoothing"]:
    notes.append(f"Label smoothing: peer {PEER_TRAINING['label_smoothing']}, "
                 f"ours {config.label_smoothing}.")
  if config.grad_accum_steps != 1:
    notes.append(f"Ours accumulates over {config.grad_accum_steps} "
                 "micro-batches; the peer takes the whole batch at once.")
  if ours["dtype"] != "float32":
    notes.append(f"Ours computes in {ours['dtype']}; the peer in float32.")
  return notes


def measure_peer(peer_dir: str, spec: Dict[str, Any], threads: int,
                 steps: int, repeats: int) -> Dict[str, Any]:
  """The peer's training step (Trainer/vit.py, train_one_epoch), timed."""
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  sys.path.insert(0, os.path.abspath(peer_dir))
  from Network.transformer import MaskTransformer  # pylint: disable=all
  side, codes = spec["side"], spec["codebook_size"]
  model = MaskTransformer(
      img_size=16 * side, hidden_dim=spec["hidden_size"],
      codebook_size=codes, depth=spec["num_layers"], heads=spec["num_heads"],
      mlp_dim=spec["mlp_dim"], dropout=spec["dropout_rate"],
      nclass=spec["num_classes"])
  model.train()
  criterion = torch.nn.CrossEntropyLoss(
      label_smoothing=PEER_TRAINING["label_smoothing"])
  optimizer = torch.optim.AdamW(
      model.parameters(), PEER_TRAINING["learning_rate"],
      betas=PEER_TRAINING["betas"],
      weight_decay=PEER_TRAINING["weight_decay"])
  batch = spec["batch_size"]
  code = torch.randint(0, codes, (batch, side, side))
  labels = torch.randint(0, spec["num_classes"], (batch,))

  def step() -> float:
    # The class condition is dropped for a fraction of the batch (CFG).
    drop = torch.rand(batch) < spec["label_dropout"]
    # get_mask_code: a per-example ratio arccos(r) / (pi / 2), then each
    # token hidden with that probability, replaced by the mask value.
    ratio = torch.arccos(torch.rand(batch)) / (math.pi * 0.5)
    mask = torch.rand(code.shape) < ratio.view(batch, 1, 1)
    masked = code.masked_fill(mask, codes)
    logits = model(masked, labels, drop_label=drop)
    loss = criterion(logits.reshape(-1, codes + 1), code.view(-1))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(),
                                   PEER_TRAINING["grad_clip_norm"])
    optimizer.step()
    return loss.item()  # the loop reads the loss every step

  def run():
    for _ in range(steps):
      step()
  seconds = harness.median_seconds(run, repeats) / steps
  non_embedding = sum(p.numel() for name, p in model.named_parameters()
                      if name not in ("tok_emb.weight", "pos_emb", "bias"))
  flops = harness.transformer_flops(non_embedding, batch, side * side + 1,
                                    spec["num_layers"], spec["hidden_size"],
                                    training=True)
  return {"seconds_per_step": seconds, "non_embedding_params": non_embedding,
          "model_flops_per_step": flops, "torch_version": torch.__version__,
          "threads": torch.get_num_threads()}


# --- the parent ---------------------------------------------------------------


def _worker_args(args, child: str, spec=None) -> List[str]:
  argv = [os.path.abspath(__file__), f"--child={child}",
          f"--config={args.config}", f"--repeats={args.repeats}",
          f"--steps={args.steps}", f"--peak_sizes={args.peak_sizes}",
          f"--peak_repeats={args.peak_repeats}",
          f"--peer_threads={args.peer_threads}"]
  argv += [f"--set={text}" for text in args.set]
  for name in ("codebook_size", "num_tokens", "peer_dir"):
    if getattr(args, name) is not None:
      argv.append(f"--{name}={getattr(args, name)}")
  if spec is not None:
    argv.append(f"--peer_spec={json.dumps(spec)}")
  return argv


def summarize(args, config, ours: List[Dict[str, Any]],
              peer: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The JSON record: medians over rounds, FLOPs, utilisation, provenance."""
  first = ours[0]
  seconds = statistics.median(r["seconds_per_step"] for r in ours)
  batch = first["batch_size"]
  steps_per_s = 1.0 / seconds
  if first["stage"] == "transformer":
    tokens_per_example = first["num_tokens"] + 1
    tokens_counted = "num_tokens + 1 (the class token) per example"
  else:
    tokens_per_example = first["num_tokens"]
    tokens_counted = "codes of the token grid per image"
  peak = max((r["peak"] for r in ours), key=lambda p: p["flops_per_s"])
  achieved = first["model_flops_per_step"] * steps_per_s
  result = {
      "benchmark": "train_throughput", "config": args.config,
      "overrides": list(args.set), "stage": first["stage"],
      "batch_size": batch, "dtype": first["dtype"],
      "codebook_size": first["codebook_size"],
      "num_tokens": first["num_tokens"],
      "tokens_source": first["tokens_source"], "model": first["model"],
      "rounds": args.rounds, "repeats": args.repeats,
      "steps_per_repeat": args.steps,
      "seconds_per_step_by_round": [r["seconds_per_step"] for r in ours],
      "seconds_per_step": seconds, "steps_per_s": steps_per_s,
      "examples_per_s": batch * steps_per_s,
      "tokens_per_s": batch * tokens_per_example * steps_per_s,
      "tokens_counted": tokens_counted,
      "model_flops_per_step": first["model_flops_per_step"],
      "flops_source": first["flops_source"],
      "xla_flops_per_step": first["xla_flops_per_step"],
      "achieved_flops_per_s": achieved,
      **harness.utilization(achieved, peak, first["machine"]["device_kind"],
                            args.nominal_peak),
      "compile_seconds": first["compile_seconds"],
      "machine": first["machine"], "date": harness.now(),
      **harness.git_commit(),
  }
  for key in ("non_embedding_params", "timed_from_step", "xla_flops_note"):
    if key in first:
      result[key] = first[key]
  if "matmul_floor" in first:
    by_round = [r["matmul_floor"]["seconds_per_step"] for r in ours]
    floor_seconds = statistics.median(by_round)
    floor_flops = first["matmul_floor"]["flops_per_step"]
    result["matmul_floor"] = {
        "seconds_per_step_by_round": by_round,
        "seconds_per_step": floor_seconds,
        "examples_per_s": batch / floor_seconds,
        "flops_per_step": floor_flops,
        "flops_per_s": floor_flops / floor_seconds,
        "streams": first["matmul_floor"]["streams"],
        "step_over_floor": seconds / floor_seconds}
  if peer:
    peer_seconds = statistics.median(r["seconds_per_step"] for r in peer)
    peer_achieved = peer[0]["model_flops_per_step"] / peer_seconds
    result["peer"] = {
        "repo": PEER_REPO, "dir": os.path.abspath(args.peer_dir),
        "commit": _peer_commit(args.peer_dir),
        "sizes": peer_spec(first, config), **{
            k: peer[0][k] for k in ("non_embedding_params",
                                    "model_flops_per_step", "torch_version",
                                    "threads")},
        "seconds_per_step_by_round": [r["seconds_per_step"] for r in peer],
        "seconds_per_step": peer_seconds, "steps_per_s": 1.0 / peer_seconds,
        "examples_per_s": batch / peer_seconds,
        "tokens_per_s": batch * tokens_per_example / peer_seconds,
        "achieved_flops_per_s": peer_achieved,
        "flop_utilization": peer_achieved / peak["flops_per_s"]}
    result["examples_per_s_ours_over_peer"] = (
        result["examples_per_s"] / result["peer"]["examples_per_s"])
    if "matmul_floor" in result:
      result["matmul_floor"]["examples_per_s_over_peer"] = (
          result["matmul_floor"]["examples_per_s"] /
          result["peer"]["examples_per_s"])
    result["peer_notes"] = peer_notes(config, first, args.peer_threads)
  return result


def _peer_commit(peer_dir: str):
  """The checkout's commit, when it is a git work tree (else None)."""
  import subprocess
  try:
    return subprocess.run(["git", "-C", peer_dir, "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _check_peer_dir(peer_dir: str) -> None:
  for part in ("Network/transformer.py", "Trainer/vit.py"):
    if not os.path.isfile(os.path.join(peer_dir, part)):
      raise SystemExit(f"--peer_dir={peer_dir!r} does not hold {part}; pass "
                       f"a checkout of {PEER_REPO}.")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="config file[:variant], e.g. "
                      "configs/maskgit_fashion_mnist.py:tiny")
  parser.add_argument("--set", action="append", default=[],
                      metavar="KEY.PATH=VALUE",
                      help="config override, repeatable: --set batch_size=32")
  parser.add_argument("--codebook_size", type=int, default=None,
                      help="transformer: the tokenizer's codebook size")
  parser.add_argument("--num_tokens", type=int, default=None,
                      help="transformer: image tokens per example")
  parser.add_argument("--peer_dir", default=None,
                      help=f"checkout of {PEER_REPO}: also time its step")
  parser.add_argument("--peer_threads", type=int, default=2,
                      help="torch threads of the peer's worker")
  harness.add_common_flags(
      parser, repeats_help="timed repeats per worker (the median counts)")
  parser.add_argument("--steps", type=int, default=5,
                      help="train steps per timed repeat")
  parser.add_argument("--child", choices=("ours", "peer"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--peer_spec", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  harness.require_positive(
      parser, args, ("rounds", "repeats", "steps", "peak_repeats",
                     "peer_threads"))
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child == "ours":
    try:
      print(json.dumps(measure_ours(args)))
    except ValueError as error:
      raise SystemExit(f"Error: {error}") from None
    return
  if args.child == "peer":
    print(json.dumps(measure_peer(args.peer_dir, json.loads(args.peer_spec),
                                  args.peer_threads, args.steps,
                                  args.repeats)))
    return

  if args.peer_dir:
    _check_peer_dir(args.peer_dir)
  try:  # The parent reads the config (no jax) to check it and for notes.
    config = harness.load_config(args.config, ["dtype=float32", *args.set])
  except ValueError as error:
    raise SystemExit(f"Error: {error}") from None
  if args.peer_dir and config.stage != "transformer":
    raise SystemExit("--peer_dir compares transformer training; "
                     f"{args.config} is a {config.stage} config.")
  ours, peer, spec = [], [], None
  for round_index in range(args.rounds):
    ours.append(harness.run_worker_json(_worker_args(args, "ours")))
    line = f"round {round_index + 1}: ours {ours[-1]['seconds_per_step']:.4f}"
    if args.peer_dir:
      spec = spec or peer_spec(ours[0], config)
      peer.append(harness.run_worker_json(_worker_args(args, "peer", spec)))
      line += f", peer {peer[-1]['seconds_per_step']:.4f}"
    print(line + " s/step", flush=True)
  result = summarize(args, config, ours, peer)
  shown = ("examples_per_s", "tokens_per_s", "flop_utilization", "mfu",
           "examples_per_s_ours_over_peer")
  print(json.dumps({k: result[k] for k in shown
                    if result.get(k) is not None}))
  if "matmul_floor" in result:
    print("matmul floor: " + json.dumps(
        {k: v for k, v in result["matmul_floor"].items()
         if not k.endswith("by_round")}))
  harness.write_json(args.out, result)


if __name__ == "__main__":
  main()
