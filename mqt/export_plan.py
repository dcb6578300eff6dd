"""The export plan: which HF tensor each of our parameters makes, in which shard.

mqt/convert_rules.py's tables read backwards: every import hook has its inverse
(`convert_rules.INVERSE`: a transpose undone, the patch conv [H, W, I, O] -> [O, I, H, W]),
and the q, k, v pieces [W, W] / [W] of `nn.MultiheadAttention` are concatenated back
into `in_proj` [3W, W] / [3W], so conversion stays one table each way. Everything here
comes from shapes; nothing is read.
"""
import dataclasses
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from mqt import convert_rules as rules_lib
from mqt.checkpoint_io import CheckpointError

ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.float16): "F16"}
TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class ExportError(ValueError):
  """Parameters or paths that cannot be exported: the message names the culprit."""


def out_dtype(name) -> np.dtype | None:
  """"float32" | "bfloat16" | "float16" | a dtype | None -> a numpy dtype (or None)."""
  if name is None:
    return None
  return np.dtype({"bfloat16": ml_dtypes.bfloat16}.get(str(name), name))


def _join_rows(pieces):
  """q, k, v pieces (kernels [W, W] as [in, out], or biases [W]) -> in_proj [3W, ...]."""
  return np.concatenate([p.T if p.ndim == 2 else p for p in pieces])


def components():
  """(our subtree, rule table, HF key prefix) in the order the shards hold them."""
  return [("llm", rules_lib.llama_rules(), ""),
          ("query", rules_lib.official_query_rules(), rules_lib.LLAVA_QUERY),
          ("vision", rules_lib.clip_rules(), rules_lib.LLAVA_CLIP)]


@dataclasses.dataclass(frozen=True)
class Piece:
  path: str  # Our leaf, "/"-joined: "llm/layers/q_proj/kernel".
  layer: int | None  # Index into a scanned leaf's leading [L] axis, or None.


@dataclasses.dataclass
class Tensor:
  """One HF tensor: its key, shape, and how it is made from our leaves."""
  key: str
  shape: tuple
  pieces: list  # [Piece]
  join: Callable  # [our arrays, in pieces' order] -> the HF array.
  dtype: np.dtype = None
  offset: int = 0  # Within the shard's data.

  @property
  def nbytes(self) -> int:
    return nbytes_of(self.shape, self.dtype)


def _parts(shapes: dict):
  """-> {HF key: [(Piece, import hook, our piece's shape)]}: the import plans
  (`plan_component`) of each component, made from our leaves' shapes."""
  groups = {}
  for comp, rules, prefix in components():
    sub = {k[len(comp) + 1:]: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()
           if k.startswith(comp + "/")}
    scanned = any(k.startswith("layers/") for k in sub)
    try:
      leaves = rules_lib.plan_component(rules, traverse_util.unflatten_dict(sub, sep="/"),
                                        prefix, scanned)
    except CheckpointError as e:
      raise ExportError(f"{comp}: {e} (the released layout holds the official query "
                        f"transformer, CLIP and LLaMA only)") from None
    for path, leaf in leaves.items():
      for part in leaf.parts:
        groups.setdefault(part.key, []).append(
            (Piece(f"{comp}/{path}", part.index), part.hook, leaf.part_shape))
  return groups


def plan(shapes: dict) -> list:
  """Our leaves {path: (shape, dtype)} -> [Tensor] in writing order (leaf by leaf, a
  scanned leaf's layers in a row; dtype unset). Each HF key is made by one inverse hook,
  or from the three `rows` parts of a packed `in_proj`; its shape is `hf_shape`
  (the written array is checked against it)."""
  missing = sorted(c for c, _, _ in components() if not any(k.startswith(c + "/") for k in shapes))
  if missing:
    raise ExportError(f"the parameters have no {missing} part (the released layout holds all "
                      f"three of vision, query, llm)")
  tensors = []
  for key, group in _parts(shapes).items():
    parts = [getattr(hook, "packed_part", None) for _, hook, _ in group]
    piece, hook, shape = group[0]
    if len(group) == 1 and parts[0] is None:
      if hook not in rules_lib.INVERSE:
        raise ExportError(f"no inverse for the import hook of {key} ({piece.path})")
      inverse = rules_lib.INVERSE[hook]
      pieces, join = [piece], lambda ws, inverse=inverse: inverse(ws[0])
    elif sorted(parts) == [0, 1, 2]:
      pieces, join = [group[parts.index(j)][0] for j in range(3)], _join_rows
    else:
      raise ExportError(f"HF key {key} is made by {len(group)} rules "
                        f"({[p.path for p, _, _ in group]}) that are not the q, k, v rows")
    tensors.append(Tensor(key, rules_lib.hf_shape(hook, shape), pieces, join))
  return tensors


def nbytes_of(shape, dtype) -> int:
  """Bytes of an array of `shape` and `dtype`."""
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def flat_shapes(tree) -> dict:
  """A tree of arrays or ShapeDtypeStructs -> {"a/b/c": (shape, numpy dtype)}."""
  return {k: (tuple(v.shape), np.dtype(v.dtype))
          for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def planned(shapes: dict, dtype=None) -> list:
  """`plan` with each tensor's output dtype set (dtype None: its leaf's own)."""
  tensors = plan(shapes)
  for t in tensors:
    t.dtype = out_dtype(dtype) or shapes[t.pieces[0].path][1]
    if t.dtype not in ST_DTYPES:
      raise ExportError(f"{t.key}: dtype {t.dtype} cannot be exported (float32, bfloat16, "
                        f"float16)")
  return tensors


def shard(tensors, shard_bytes: int) -> list:
  """[Tensor] -> [[Tensor]] consecutive groups of at most shard_bytes (a larger tensor
  alone), offsets set."""
  shards, size = [[]], 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > shard_bytes:
      shards.append([])
      size = 0
    t.offset = size
    shards[-1].append(t)
    size += t.nbytes
  return shards


def shard_name(k: int, n: int) -> str:
  return f"model-{k + 1:05d}-of-{n:05d}.safetensors"

