"""Is a checkpoint that failed to restore damaged? Decided on evidence only.

A checkpoint judged damaged is set aside and training walks back to an
older one, so a wrong "yes" costs days of pod time: transient and resource
errors, sharding and programming errors are never damage. The rules and
the errors they were read off (orbax 0.12, tensorstore, grain 0.2) are in
`is_damage`.
"""

import json
import os
import re
from typing import List, Optional, Sequence

from etils import epath
import jax

STATE, DATA = "state", "data"   # the two items of every checkpoint


# grain's DataLoader refuses a saved position of another data source,
# sampler (record count, shuffle seed, shard) or worker count with these.
_DATA_MISMATCH = re.compile(
    r"(DataSource|Sampler|Worker count) in checkpoint does not match")


def data_mismatch(error: BaseException) -> Optional[str]:
  """grain's own words when it refuses a saved data position that belongs
  to another dataset or data order (else None)."""
  for link in _chain(error):
    if _DATA_MISMATCH.search(str(link)):
      return " ".join(str(link).split("\n")[:3])
  return None




def _chain(error: Optional[BaseException]) -> List[BaseException]:
  """`error` and the exceptions behind it (cause or context), in order."""
  links, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    links.append(error)
    error = error.__cause__ or error.__context__
  return links


def short_message(text: str, limit: int = 400) -> str:
  """An error message cut to `limit` characters, keeping its head (a
  tensorstore status code) and its tail (the innermost cause); tensorstore
  also appends its whole spec as JSON, which is dropped."""
  text = re.split(r" \[tensorstore_spec(\[\d+\])?=", text)[0].strip()
  if len(text) <= limit:
    return text
  head = limit // 3
  return f"{text[:head]} ... {text[len(text) - (limit - head):]}"


# Errors that say nothing about the stored bytes: never damage, whatever
# else is true (a re-run after fixing them tells damage apart).
_NEVER_DAMAGE = (MemoryError, TimeoutError, ConnectionError, InterruptedError,
                 PermissionError)
# tensorstore reports errors with an absl status code leading the message.
_TRANSIENT_STATUS = re.compile(
    r"^(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|CANCELLED|"
    r"PERMISSION_DENIED|UNAUTHENTICATED):")
_DAMAGE_STATUS = (
    # Checksum or decode failure of stored bytes (e.g. a truncated OCDBT
    # manifest: "Length in header (113) does not match actual length").
    re.compile(r"^DATA_LOSS:"),
    # A stored file or array that is gone ("... does not exist").
    re.compile(r"^NOT_FOUND:"),
    # A truncated data file: "Requested byte range [0, 498) is not valid for
    # value of size 249" (other OUT_OF_RANGE errors are index errors).
    re.compile(r"^OUT_OF_RANGE:.*byte range", re.S),
    # Unreadable JSON metadata read through tensorstore (e.g. _sharding).
    re.compile(r"^FAILED_PRECONDITION:.*Invalid JSON", re.S),
)


def _damaged_files(checkpoint_dir: str,
                   items: Sequence[str]) -> Optional[str]:
  """What is missing or empty on disk in a checkpoint folder, if anything:
  the files orbax and grain always write (state/_METADATA, the OCDBT
  manifest, this process's data position) and any empty stored file."""
  root = epath.Path(checkpoint_dir)
  state = root / STATE
  if not state.exists():
    return f"{STATE}/ is missing"
  wanted = [state / "_METADATA"]
  if (state / "d").exists():  # OCDBT layout: the manifest indexes d/.
    wanted.append(state / "manifest.ocdbt")
  data = root / DATA
  if DATA in items and data.exists():
    wanted.append(data / _data_file_name())
  for path in wanted:
    if not path.exists():
      return f"{os.fspath(path.relative_to(root))} is missing"
  for path in [*wanted, *sorted((state / "d").glob("*"))]:
    if path.exists() and not path.is_dir() and path.stat().length == 0:
      return f"{os.fspath(path.relative_to(root))} is empty"
  return None


def is_damage(error: BaseException, checkpoint_dir: str,
              items: Sequence[str] = (STATE, DATA)) -> Optional[str]:
  """Why `error`, raised while restoring `items` of `checkpoint_dir`, shows
  the stored checkpoint is damaged; None when it shows nothing of the kind.

  Only evidence counts, because a checkpoint judged damaged is set aside and
  training walks back to an older one:
    - never damage: MemoryError, TimeoutError (OSError ETIMEDOUT),
      ConnectionError, PermissionError, or a tensorstore UNAVAILABLE,
      DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ... status;
    - damage: a file orbax or grain always writes is missing or empty on
      disk (state/, state/_METADATA, state/manifest.ocdbt, this process's
      data/process_<i>-of-<n>.json, a file under state/d/);
    - damage: a tensorstore DATA_LOSS (checksum or decode failure), NOT_FOUND
      (a missing stored file), OUT_OF_RANGE on a byte range (a truncated
      file) or FAILED_PRECONDITION "Invalid JSON" status;
    - damage: stored JSON that does not parse (json.JSONDecodeError: a
      truncated _METADATA or data position), or a FileNotFoundError for a
      file inside the checkpoint.
  Everything else (a sharding, shape or programming error) is not damage.
  """
  links = _chain(error)
  for link in links:
    if isinstance(link, _NEVER_DAMAGE) or _TRANSIENT_STATUS.match(str(link)):
      return None
  on_disk = _damaged_files(checkpoint_dir, items)
  if on_disk:
    return on_disk
  inside = os.path.abspath(os.fspath(checkpoint_dir))
  for link in links:
    text = str(link)
    if any(pattern.match(text) for pattern in _DAMAGE_STATUS):
      return short_message(text)
    if isinstance(link, json.JSONDecodeError):
      return f"unreadable JSON metadata ({link})"
    if (isinstance(link, FileNotFoundError) and link.filename and
        os.path.abspath(os.fspath(link.filename)).startswith(inside)):
      return f"{link.filename} is missing"
  return None


def _data_file_name() -> str:
  """grain's name for this process's saved data position."""
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"
