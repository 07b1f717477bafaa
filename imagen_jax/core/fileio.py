"""File I/O for every layer: local paths and gs:// (gcsfs) through the same calls.

- `resolve` is applied where a path enters (command-line flags, config fields, library entry
  points): `~` is expanded and a relative local path becomes absolute, so a path means the same
  in every process and thread (Orbax and tensorstore refuse relative paths) and a config stored
  in a workdir means the same from any directory. URLs are left as they are.
- Writes are atomic: a local file is written under a temporary name and renamed; a GCS object
  only becomes visible when its upload is finalised. Readers never see half a file.
- Writes to object stores retry transient errors a bounded number of times, then raise
  `StorageError` naming the path and the cause.

gcsfs honours `STORAGE_EMULATOR_HOST`, so tests point everything here at a local GCS emulator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from typing import IO, Callable, Iterator, TypeVar
import uuid

import fsspec

_T = TypeVar("_T")

# gcsfs probes each bucket's type through an API that emulators lack and logs the failure at
# WARNING for every call; the fallback is what we want, so the message is only noise.
logging.getLogger("gcsfs").setLevel(logging.ERROR)


def is_remote(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def resolve(path: str) -> str:
  """`path` independent of the current directory: absolute, `~` expanded; URLs and '' as given."""
  if not path or is_remote(path):
    return path
  if path.startswith("file://"):
    path = path[len("file://"):]
  return os.path.abspath(os.path.expanduser(path))


# Spec kinds whose part after "KIND:" is a path (data sources, the encode job's text files).
# Others name something (shapes:256, tfds:coco_captions, builtin:shapes-tiny) and stay as given.
PATH_KINDS = ("folder", "wds", "text")


def resolve_spec(spec: str) -> str:
  """`folder:PATH`, `wds:PATTERN`, `text:PATH` with the path resolved; other specs as given."""
  kind, sep, rest = spec.partition(":")
  if sep and kind in PATH_KINDS:
    return f"{kind}:{resolve(rest)}"
  return spec


class StorageError(OSError):
  """A read or write that failed for good: the message names the path and the cause."""


# Errors that no retry mends: the path or the permission is wrong.
_PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
              FileExistsError)
REMOTE_ATTEMPTS = 4
RETRY_DELAY_S = 1.0


def with_retries(fn: Callable[[], _T], path: str, what: str = "writing") -> _T:
  """fn(), retried with exponential back-off when `path` is remote and the error may be transient.

  Object stores fail now and then (HTTP 429/5xx, dropped connections); gcsfs retries some of
  those itself, and this bounds what is left. Local paths get one attempt: a full disk does not
  empty itself. The final failure is a StorageError naming the path.
  """
  attempts = REMOTE_ATTEMPTS if is_remote(path) else 1
  for attempt in range(1, attempts + 1):
    try:
      return fn()
    except _PERMANENT as e:
      raise StorageError(f"{what} {path} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # pylint: disable=broad-except
      if attempt == attempts:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        raise StorageError(f"{what} {path} failed{tries}: {type(e).__name__}: {e}") from e
      delay = RETRY_DELAY_S * 2 ** (attempt - 1)
      logging.warning("%s %s failed (%s: %s); retrying in %.0f s (%d/%d)", what, path,
                      type(e).__name__, e, delay, attempt, attempts - 1)
      time.sleep(delay)
  raise AssertionError("unreachable")


def join(*parts: str) -> str:
  if is_remote(parts[0]):
    return posixpath.join(*parts)
  return os.path.join(*parts)


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """(filesystem, path inside it) for a local path or a URL such as gs://bucket/dir."""
  fs, inner = fsspec.core.url_to_fs(path)
  return fs, inner


def exists(path: str) -> bool:
  fs, inner = filesystem(path)
  if is_remote(path):
    fs.invalidate_cache(inner)  # another process may have written it since we last looked
  return fs.exists(inner)


def isdir(path: str) -> bool:
  fs, inner = filesystem(path)
  return fs.isdir(inner)


def size(path: str) -> int:
  fs, inner = filesystem(path)
  if is_remote(path):
    fs.invalidate_cache(inner)
  return int(fs.size(inner))


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
  """The file's bytes, or bytes [start, end) of it (one ranged GET on gs://)."""
  fs, inner = filesystem(path)
  return fs.cat_file(inner, start=start, end=end)


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def makedirs(path: str) -> None:
  """Creates a local directory and its parents (object stores have no directories)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[IO[bytes]]:
  """A binary stream that appears at `path` whole on success and not at all on failure."""
  if is_remote(path):
    fs, inner = filesystem(path)
    # Object stores publish an object when its upload is finalised (on close): a crash before
    # that leaves nothing. On an exception we abort the upload instead of finalising it.
    f = fs.open(inner, "wb")
    try:
      yield f
    except BaseException:
      with contextlib.suppress(Exception):
        f.discard()
      raise
    f.close()
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
  try:
    with open(tmp, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove_stale_temporaries(path: str) -> None:
  """Deletes local temporaries of `path` left by a killed writer (object stores leave none)."""
  if is_remote(path):
    return
  directory, base = os.path.split(os.path.abspath(path))
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if name.startswith(".tmp-") and name.endswith("-" + base):
        with contextlib.suppress(FileNotFoundError):
          os.remove(os.path.join(directory, name))


def write_bytes(path: str, data: bytes) -> None:
  """Writes the whole file atomically (retrying transient object-store errors)."""

  def write():
    with atomic_writer(path) as f:
      f.write(data)

  with_retries(write, path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  """Deletes a file."""
  fs, inner = filesystem(path)
  fs.rm_file(inner)


def listdir(path: str) -> list[str]:
  """Base names of the entries of a directory (empty if it does not exist)."""
  fs, inner = filesystem(path)
  if is_remote(path):
    fs.invalidate_cache(inner)
  if not fs.exists(inner):
    return []
  return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def files_under(path: str) -> list[str]:
  """Every file below a directory, recursively, as full paths (URLs keep their scheme)."""
  if not is_remote(path):
    return sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
  fs, inner = filesystem(path)
  fs.invalidate_cache(inner)
  scheme = path.split("://", 1)[0]
  return sorted(f"{scheme}://{p}" for p in fs.find(inner))


def glob(pattern: str) -> list[str]:
  """The paths matching a glob pattern (`*`, `?`, `[...]`; `**` across directories)."""
  fs, inner = filesystem(pattern)
  if not is_remote(pattern):
    return sorted(fs.glob(inner))
  fs.invalidate_cache()
  scheme = pattern.split("://", 1)[0]
  return sorted(f"{scheme}://{p}" for p in fs.glob(inner))


def open_read(path: str) -> IO[bytes]:
  """A binary stream reading the file (for streaming formats such as tar)."""
  fs, inner = filesystem(path)
  return fs.open(inner, "rb")


def du(path: str) -> int:
  """Total bytes of the files under `path`."""
  fs, inner = filesystem(path)
  if is_remote(path):
    fs.invalidate_cache(inner)
  return int(sum(fs.du(inner, total=False).values())) if fs.exists(inner) else 0
