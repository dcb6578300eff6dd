"""Read HF-format tensor files lazily: safetensors (own reader) and torch .bin.

A checkpoint is a file (`*.safetensors`, `*.bin`), an index json
(`*.index.json`, sharded), or a directory holding one of those. Opening one
reads only headers. Tensors are read one at a time, each into a buffer of its
own (`readinto` at its offset; no file stays memory-mapped, so resident memory
holds only the tensors still referenced), so a 7B checkpoint never sits in
memory twice. Paths go through mqt.paths: safetensors checkpoints may lie at a
gs:// (or other epath) URI, read the same way, by seek and read; torch .bin
files are read from local disk only.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

from mqt import paths

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DIR_CANDIDATES = ("model.safetensors.index.json", "model.safetensors",
                   "pytorch_model.bin.index.json", "pytorch_model.bin")
_READ_CHUNK = 64 << 20  # Bytes per read() where a file object has no readinto (gfile).


def safetensors_header(entries) -> bytes:
  """The header of a safetensors file holding `entries` [(key, numpy dtype, shape)] in
  that order, each right after the previous one (the bytes before the tensor data)."""
  names = {np.dtype(v): k for k, v in _DTYPES.items()}
  head, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, dtype, shape in entries:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    head[key] = {"dtype": names[np.dtype(dtype)], "shape": [int(d) for d in shape],
                 "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(head, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # Data starts 8-byte aligned, as safetensors writes it.
  return struct.pack("<Q", len(raw)) + raw


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: the message names the key and file."""


class _SafetensorsFile:
  def __init__(self, path: str):
    self.path = path
    with paths.open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file (no header)")
      (n,) = struct.unpack("<Q", head)
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
      self._data_start = 8 + n
    size = paths.getsize(path)
    header.pop("__metadata__", None)
    self.entries = header
    for key, e in header.items():
      start, end = e["data_offsets"]
      if self._data_start + end > size:
        raise CheckpointError(f"{path}: tensor {key} runs past the end of the file "
                              f"(truncated download?)")

  def shape(self, key):
    return tuple(self.entries[key]["shape"])

  def get(self, key) -> np.ndarray:
    e = self.entries[key]
    if e["dtype"] not in _DTYPES:
      raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {e['dtype']}")
    start, end = e["data_offsets"]
    buf = np.empty(end - start, np.uint8)
    with paths.open(self.path, "rb") as f:
      f.seek(self._data_start + start)
      if _fill(f, memoryview(buf)) < len(buf):
        raise CheckpointError(f"{self.path}: tensor {key} runs past the end of the file")
    return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def _fill(f, view: memoryview) -> int:
  """Reads from `f` into `view` until it is full or the file ends; -> bytes read."""
  readinto, got = getattr(f, "readinto", None), 0
  while got < len(view):
    if readinto is not None:
      n = readinto(view[got:])
    else:
      chunk = f.read(min(len(view) - got, _READ_CHUNK))
      n = len(chunk)
      view[got:got + n] = chunk
    if not n:
      break
    got += n
  return got


class _TorchFile:
  """A torch `.bin` state dict, memory-mapped where the format allows (zip). Pages a
  mapping has touched count as resident, so the mapping is dropped (and made again
  on the next read) every `REMAP_BYTES` read through it."""

  REMAP_BYTES = 1 << 30

  def __init__(self, path: str):
    if paths.is_uri(path):  # torch maps a local file; reading a URI would hold it whole.
      raise CheckpointError(f"{path}: torch .bin checkpoints are read from local disk only; "
                            f"copy it to a local folder or convert it to safetensors")
    try:
      import torch  # Only needed for pickled checkpoints.
    except ImportError:
      raise CheckpointError(f"{path}: reading torch .bin checkpoints needs torch; "
                            f"convert it to safetensors or install torch") from None
    self.path = path
    self._torch = torch
    self._sd, self._read = self._load(), 0
    self.entries = {k: tuple(t.shape) for k, t in self._sd.items()}

  def _load(self):
    try:  # Memory-mapped (zip format): tensors are paged in when read.
      return self._torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # The legacy (non-zip) format cannot be mapped.
      return self._torch.load(self.path, map_location="cpu", weights_only=True)

  def shape(self, key):
    return self.entries[key]

  def get(self, key) -> np.ndarray:
    if self._sd is None:
      self._sd, self._read = self._load(), 0
    t = self._sd[key]
    if t.dtype == self._torch.bfloat16:  # Bit-exact, through int16.
      out = t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    else:
      out = t.numpy().copy()
    self._read += out.nbytes
    if self._read > self.REMAP_BYTES:
      self._sd = None
    return out


def _open_file(path: str):
  if path.endswith(".safetensors"):
    return _SafetensorsFile(path)
  if path.endswith((".bin", ".pt", ".pth")):
    return _TorchFile(path)
  raise CheckpointError(f"{path}: not a .safetensors or .bin file")


class TensorSource:
  """Name -> tensor view over one checkpoint file, a sharded index, or a directory."""

  def __init__(self, path: str):
    path = os.fspath(path)
    if paths.isdir(path):
      found = [c for c in _DIR_CANDIDATES if paths.exists(paths.join(path, c))]
      if not found:
        raise CheckpointError(f"{path}: no checkpoint found; looked for {list(_DIR_CANDIDATES)}")
      path = paths.join(path, found[0])
    if not paths.exists(path):
      raise CheckpointError(f"{path}: checkpoint file does not exist")
    self.name = path
    self._where = {}
    if path.endswith(".json"):
      try:
        with paths.open(path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a valid checkpoint index ({e!r})") from None
      files = {}
      for key, rel in weight_map.items():
        if rel not in files:
          full = paths.join(paths.dirname(path), rel)
          if not paths.exists(full):
            raise CheckpointError(f"{path}: shard {rel} (holding {key}) is missing")
          files[rel] = _open_file(full)
        if key not in files[rel].entries:
          raise CheckpointError(f"{path}: index maps {key} to {rel}, which lacks it")
        self._where[key] = files[rel]
    else:
      f = _open_file(path)
      self._where = {k: f for k in f.entries}

  def keys(self):
    return self._where.keys()

  def __contains__(self, key):
    return key in self._where

  def shape(self, key):
    return self._where[key].shape(key)

  def get(self, key) -> np.ndarray:
    return self._where[key].get(key)
