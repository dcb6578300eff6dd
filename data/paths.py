"""File paths that may be local or cloud URIs (gs://, s3://, az://, hf://), through etils.epath.

Strings in, strings out: callers keep plain `str` paths and call these helpers
where they would call os.path, open, os.makedirs, os.listdir or os.rename.
The file helpers go through `epath.Path`, whose backend for a local path is
os / os.path / open, so local paths behave as before; a URI reaches the
cloud backend (TensorFlow's gfile where TensorFlow is installed, else fsspec
with gcsfs / s3fs) with the user's credentials.

String-level helpers never mangle a URI: `absolute` leaves it as given (not
os.path.abspath's "/cwd/gs:/b/x"), `join` and `dirname` keep its "scheme://".
A path that names another scheme ("http://...") is refused with one line.
"""
import functools
import importlib.util
import os
import posixpath

from etils import epath

SCHEMES = ("gs", "s3", "az", "hf")  # The URI schemes epath serves.


def _scheme(path) -> str | None:
  """The URI scheme of `path` ("gs" for "gs://b/x"), or None for a local path."""
  head, sep, _ = os.fspath(path).partition("://")
  if sep and head and head[0].isalpha() and all(c.isalnum() or c in "+.-" for c in head):
    return head
  return None


def is_uri(path) -> bool:
  """Whether `path` (str or os.PathLike) is a URI such as "gs://bucket/run"."""
  return _scheme(path) is not None


def _supported(path: str) -> str | None:
  """`path`'s URI scheme (None: a local path). Raises ValueError for one epath cannot
  serve."""
  scheme = _scheme(path)
  if scheme is not None and scheme not in SCHEMES:
    raise ValueError(f"{path}: unsupported URI scheme {scheme}://; use a local path or one of "
                     f"{', '.join(s + '://' for s in SCHEMES)}")
  return scheme


def _epath(path) -> epath.Path:
  """`path` as an epath.Path. Raises ValueError for a URI scheme epath cannot serve, or
  whose package is not installed."""
  path = os.fspath(path)
  scheme = _supported(path)
  if scheme is not None:
    _need_backend(path, scheme)
  return epath.Path(path)


# The fsspec package epath uses for each scheme where TensorFlow is not installed.
BACKENDS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}


@functools.cache
def _missing_backend(scheme: str) -> str | None:
  """The package a URI of `scheme` needs that is not installed, or None."""
  if importlib.util.find_spec("tensorflow") is not None:
    return None
  package = BACKENDS[scheme]
  return package if importlib.util.find_spec(package) is None else None


def _need_backend(path: str, scheme: str) -> None:
  missing = _missing_backend(scheme)
  if missing:
    raise ValueError(f"{path}: {scheme}:// paths need the {missing} package (pip install "
                     f"{missing}; for gs://, pip install -r requirements-cloud.txt)")


def absolute(path) -> str:
  """os.path.abspath for a local path; a URI unchanged."""
  path = os.fspath(path)
  if is_uri(path):
    _supported(path)
    return path
  return os.path.abspath(path)


def join(*parts) -> str:
  """os.path.join; a URI part keeps its "scheme://" and, like an absolute path, drops the
  parts before it."""
  parts = [os.fspath(p) for p in parts]
  start = max((i for i, p in enumerate(parts) if is_uri(p)), default=None)
  if start is None:
    return os.path.join(*parts)
  return posixpath.join(*parts[start:])


def dirname(path) -> str:
  """os.path.dirname; a URI's never goes above "scheme://bucket"."""
  path = os.fspath(path)
  if not is_uri(path):
    return os.path.dirname(path)
  prefix, _, rest = path.partition("://")
  bucket, _, key = rest.partition("/")
  parent = posixpath.dirname(key)
  return f"{prefix}://{bucket}/{parent}" if parent else f"{prefix}://{bucket}"


def exists(path) -> bool:
  return _epath(path).exists()


def isdir(path) -> bool:
  return _epath(path).is_dir()


def isfile(path) -> bool:
  """os.path.isfile for a local path; for a URI, an object that exists and is no folder."""
  if not is_uri(path):
    return os.path.isfile(path)
  return _epath(path).is_file()


def getsize(path) -> int:
  """The size of the file in bytes."""
  return int(_epath(path).stat().length)


def makedirs(path) -> None:
  """Creates the folder and its parents; no error if it exists."""
  _epath(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
  """The names in the folder (not full paths; names ending in "~" left out, as epath does)."""
  return [child.name for child in _epath(path).iterdir()]


def open(path, mode: str = "r"):  # pylint: disable=redefined-builtin
  """Opens the file; use it in a `with` block. Text modes are UTF-8. Modes: r, w, a (+b)."""
  return _epath(path).open(mode)


def read_bytes(path) -> bytes:
  return _epath(path).read_bytes()


def rename(src, dst) -> None:
  """Renames a file or folder; FileExistsError if `dst` exists. On an object store a
  folder's rename copies every object (not atomic)."""
  _epath(src).rename(dst)


def replace(src, dst) -> None:
  """Renames the file `src` to `dst`, replacing a file there."""
  _epath(src).replace(dst)


def write_bytes_atomic(path, data: bytes) -> str:
  """Writes `data` to `<path>.tmp`, then renames it over `path`, so that a reader never
  sees half a file; -> `path` (as str)."""
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  replace(tmp, path)
  return path


def write_text_atomic(path, text: str) -> str:
  """`write_bytes_atomic` of `text` as UTF-8; -> `path` (as str)."""
  return write_bytes_atomic(path, text.encode("utf-8"))

