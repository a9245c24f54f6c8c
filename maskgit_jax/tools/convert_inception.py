r"""Converts the standard FID Inception weights into a plain .npz, once.

  python -m maskgit_jax.tools.convert_inception \
      --src pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

The .pth is the file pytorch-fid and torch-fidelity download (the
2015-12-05 TensorFlow InceptionV3 graph ported to PyTorch). It is read with
torch's weights-only loader, so nothing in it runs; PyTorch is needed for
this step only, never by the package. Point `config.eval.inception_weights`
at the .npz afterwards.

Flags are parsed with argparse rather than absl so that importing this
module (the tests do) defines no global flags.
"""

import argparse
import os
import sys
from typing import Dict, List, Mapping, Optional

import numpy as np

from maskgit_jax.models import inception

TORCH_HINT = ("convert_inception reads the .pth with PyTorch, which the "
              "package does not depend on; install it for this one step "
              "(e.g. `pip install torch`, a CPU build is enough) and rerun.")


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{key: numpy array} from a torch state-dict file, weights-only."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(TORCH_HINT) from e
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No such file: {path!r}. Download {inception.TORCH_WEIGHTS_FILE} "
        f"from {inception.TORCH_WEIGHTS_URL}.")
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state "
                     f"dict; expected {inception.TORCH_WEIGHTS_FILE}.")
  arrays = {}
  for key, value in state.items():
    if not torch.is_tensor(value):
      raise ValueError(f"{path!r}: entry {key!r} is a "
                       f"{type(value).__name__}, not a tensor.")
    arrays[key] = value.detach().cpu().numpy()
  return arrays


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       out: str) -> Dict[str, np.ndarray]:
  """Maps and checks the torch arrays, then writes `out` atomically (a
  half-written file never sits under the final name)."""
  flat = inception.params_from_torch(state_dict)
  partial = out + ".partial"
  inception.save_params(flat, partial)
  os.replace(partial, out)
  return flat


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m maskgit_jax.tools.convert_inception",
      description="Torch FID InceptionV3 weights (.pth) -> plain .npz.")
  parser.add_argument("--src", required=True,
                      help=f"the torch file, {inception.TORCH_WEIGHTS_FILE}")
  parser.add_argument("--out", default=inception.DEFAULT_NPZ,
                      help="the .npz to write (default: %(default)s)")
  return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  try:
    flat = convert_state_dict(read_torch_state_dict(args.src), args.out)
  except (ImportError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {len(flat)} arrays to {args.out}; set "
        f"config.eval.inception_weights={args.out!r}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
