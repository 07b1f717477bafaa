"""Small file helpers over fsspec: the same calls for local paths and gs:// (gcsfs).

gcsfs honours `STORAGE_EMULATOR_HOST`, so tests point everything here at a local GCS emulator.
Writes are atomic: a local file is written under a temporary name and renamed; a GCS object
only becomes visible when its upload is finalised. Readers therefore never see half a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import uuid
from typing import IO, Iterator

import fsspec

# gcsfs probes each bucket's type through an API that emulators lack and logs the failure at
# WARNING for every call; the fallback is what we want, so the message is only noise.
logging.getLogger("gcsfs").setLevel(logging.ERROR)


def is_remote(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


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
  """Writes the whole file atomically."""
  with atomic_writer(path) as f:
    f.write(data)


def listdir(path: str) -> list[str]:
  """Base names of the entries of a directory (empty if it does not exist)."""
  fs, inner = filesystem(path)
  if is_remote(path):
    fs.invalidate_cache(inner)
  if not fs.exists(inner):
    return []
  return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def du(path: str) -> int:
  """Total bytes of the files under `path`."""
  fs, inner = filesystem(path)
  if is_remote(path):
    fs.invalidate_cache(inner)
  return int(sum(fs.du(inner, total=False).values())) if fs.exists(inner) else 0
