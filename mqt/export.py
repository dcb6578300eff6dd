"""Export parameters to the released MQT-LLaVA layout (HF format), streaming.

`export(source, cfg, out_dir)` writes

  model-0000k-of-0000n.safetensors  shards of at most `shard_bytes` (a larger tensor alone)
  model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map": {key: shard}}
  config.json                       LLaMA fields, LLaVA's mm_* fields, the query count
  tokenizer.model, ...              copied from a tokenizer folder (`copy_tokenizer`)

Keys are the released checkpoint's: the LLM under HF LLaMA names, the query
transformer under `model.query_abstractor.`, the vision tower under
`model.vision_tower.vision_tower.vision_model.` (HF CLIPVisionModel names).
The mapping is mqt/convert.py's rule tables read backwards: every import hook
has its inverse here (a transpose undone, the patch conv [H, W, I, O] ->
[O, I, H, W], the q, k, v pieces [W, W] / [W] of `nn.MultiheadAttention`
concatenated back into `in_proj` [3W, W] / [3W]), so conversion stays one
table each way.

Streaming: the shard headers are computed from shapes first; then one HF
tensor at a time is read from the source (one leaf, or one layer of a scanned
[L, ...] leaf), cast to the output dtype, converted and written after the
previous one. Beside what the source already holds, the host holds one layer
slice (`TreeLeaves`), or one restore group of leaves (`OrbaxLeaves`: one leaf
of the 7B is at most [32, 4096, 11008], 5.4 GiB in float32), and one tensor in
the output dtype.

Sources: `TreeLeaves` (a tree of jax arrays, sharded or not, or numpy arrays,
e.g. imported weights) and `OrbaxLeaves` (the params of an orbax checkpoint
written by train.py, restored a few leaves at a time and cast on read).
"""
import dataclasses
import json
import os
import re
import shutil
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mqt import convert
from mqt import memory as mem_lib
from mqt import sharding as shard_lib
from mqt.checkpoint_io import CheckpointError, TensorSource, safetensors_header
from mqt.model import ModelConfig, abstract_params, unbox_abstract

LLAVA_CLIP = convert._LLAVA_CLIP  # pylint: disable=protected-access
LLAVA_QUERY = convert._LLAVA_QUERY  # pylint: disable=protected-access
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json", "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 10**9  # HF's "5GB".
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.float16): "F16"}
_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class ExportError(ValueError):
  """Parameters or paths that cannot be exported: the message names the culprit."""


def out_dtype(name) -> np.dtype | None:
  """"float32" | "bfloat16" | "float16" | a dtype | None -> a numpy dtype (or None)."""
  if name is None:
    return None
  return np.dtype({"bfloat16": ml_dtypes.bfloat16}.get(str(name), name))


# ---------------------------------------------------------------------------
# The rule tables read backwards.

_INVERSE = {convert._T: lambda w: w.T, convert._ID: lambda w: w,  # pylint: disable=protected-access
            convert._CONV: lambda w: w.transpose(3, 2, 0, 1)}  # pylint: disable=protected-access


def _join_rows(pieces):
  """q, k, v pieces (kernels [W, W] as [in, out], or biases [W]) -> in_proj [3W, ...]."""
  return np.concatenate([p.T if p.ndim == 2 else p for p in pieces])


def components():
  """(our subtree, rule table, HF key prefix) in the order the shards hold them."""
  return [("llm", convert.llama_rules(), ""),
          ("query", convert.official_query_rules(), LLAVA_QUERY),
          ("vision", convert.clip_rules(), LLAVA_CLIP)]


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
    return _nbytes(self.shape, self.dtype)


def _parts(shapes: dict):
  """-> {HF key: [(Piece, import hook, our piece's shape)]}: convert's import plans
  (`plan_component`) of each component, made from our leaves' shapes."""
  groups = {}
  for comp, rules, prefix in components():
    sub = {k[len(comp) + 1:]: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()
           if k.startswith(comp + "/")}
    scanned = any(k.startswith("layers/") for k in sub)
    try:
      leaves = convert.plan_component(rules, traverse_util.unflatten_dict(sub, sep="/"), prefix,
                                      scanned)
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
  or from the three `_rows` parts of a packed `in_proj`; its shape is `convert.hf_shape`
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
      if hook not in _INVERSE:
        raise ExportError(f"no inverse for the import hook of {key} ({piece.path})")
      inverse = _INVERSE[hook]
      pieces, join = [piece], lambda ws, inverse=inverse: inverse(ws[0])
    elif sorted(parts) == [0, 1, 2]:
      pieces, join = [group[parts.index(j)][0] for j in range(3)], _join_rows
    else:
      raise ExportError(f"HF key {key} is made by {len(group)} rules "
                        f"({[p.path for p, _, _ in group]}) that are not the q, k, v rows")
    tensors.append(Tensor(key, convert.hf_shape(hook, shape), pieces, join))
  return tensors


# ---------------------------------------------------------------------------
# Parameter sources: one leaf or one layer slice at a time.

def _nbytes(shape, dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def flat_shapes(tree) -> dict:
  """A tree of arrays or ShapeDtypeStructs -> {"a/b/c": (shape, numpy dtype)}."""
  return {k: (tuple(v.shape), np.dtype(v.dtype))
          for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


_index = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))


def _host(d) -> np.ndarray:
  """One shard (a single-device jax array) -> numpy (a view where it is in host memory)."""
  if next(iter(d.devices())).platform != "cpu":
    d = jax.device_put(d, jax.local_devices(backend="cpu")[0])
  return np.asarray(d)


def to_host(x, dtype) -> np.ndarray:
  """A jax array (any sharding, any device) or numpy array -> a numpy array of `dtype`.
  Each shard is copied to the host once, into an array of its own (a jax array keeps no
  cached host copy, so host memory holds one leaf or layer at a time)."""
  if not isinstance(x, jax.Array):
    return np.asarray(x).astype(dtype, copy=False)
  if not x.is_fully_addressable:
    raise ExportError("export runs in one process: the parameters span several hosts")
  shards = {}
  for s in x.addressable_shards:
    shards.setdefault(str(s.index), s)
  if len(shards) == 1:
    return _host(next(iter(shards.values())).data).astype(dtype, copy=False)
  out = np.empty(x.shape, dtype)
  for s in shards.values():
    out[s.index] = _host(s.data)
  return out


class TreeLeaves:
  """A parameter tree {"vision", "query", "llm"} of jax (sharded or not) or numpy arrays."""

  def __init__(self, params):
    self.flat = traverse_util.flatten_dict(params, sep="/")
    self.shapes = flat_shapes(params)

  def plan(self, order, dtypes) -> None:
    del order, dtypes  # Reads are direct.

  def get(self, path: str, layer: int | None, dtype) -> np.ndarray:
    x = self.flat[path]
    if layer is not None:
      x = _index(x, layer) if isinstance(x, jax.Array) else x[layer]
    return to_host(x, dtype)


def latest_step(directory: str) -> int:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(directory):
    raise ExportError(f"checkpoint folder {directory} does not exist")
  step = ocp.CheckpointManager(os.path.abspath(directory)).latest_step()
  if step is None:
    raise ExportError(f"checkpoint folder {directory} holds no checkpoint")
  return step


class OrbaxLeaves:
  """The params of a train.py checkpoint (`state/params`), restored on demand into host
  numpy arrays, cast on read to the dtype `plan` gives each leaf: a group of consecutive
  leaves (in writing order) of at most `group_bytes` in that dtype, or one larger leaf,
  at a time. (Measured on one [32, 4096, 11008] float32 leaf, 5.4 GiB, restored as
  bfloat16: peak resident 7.7 GiB; restored as float32 and cast layer by layer: 9.0.)"""

  def __init__(self, directory: str, step: int | None = None, group_bytes: int = 2**28):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.step = latest_step(directory) if step is None else step
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    meta = self.manager.item_metadata(self.step)["state"]
    tree = getattr(meta, "tree", meta)
    if "params" not in tree:
      raise ExportError(f"checkpoint {directory} step {self.step} holds no params")
    self.shapes = flat_shapes(tree["params"])
    self.group_bytes = group_bytes
    self._order, self._dtypes, self._cache = [], {}, {}

  def plan(self, order, dtypes) -> None:
    self._order, self._dtypes = list(dict.fromkeys(order)), dict(dtypes)

  def _dtype(self, path: str):
    return self._dtypes.get(path, self.shapes[path][1])

  def _group(self, path: str) -> list:
    rest = self._order[self._order.index(path):] if path in self._order else [path]
    group, size = [], 0
    for p in rest:
      size += _nbytes(self.shapes[p][0], self._dtype(p))
      if group and size > self.group_bytes:
        break
      group.append(p)
    return group

  def _load(self, path: str) -> None:
    self._cache = {}  # Dropped before the next group is read.
    ocp, group = self._ocp, self._group(path)
    item = {p: jax.ShapeDtypeStruct(self.shapes[p][0], self._dtype(p)) for p in group}
    args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=self._dtype(p)) for p in group}
    unflat = lambda d: {"params": traverse_util.unflatten_dict(d, sep="/")}
    out = self.manager.restore(self.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=unflat(item), restore_args=unflat(args), partial_restore=True)))
    self._cache = traverse_util.flatten_dict(out["state"]["params"], sep="/")

  def get(self, path: str, layer: int | None, dtype) -> np.ndarray:
    if path not in self._cache:
      self._load(path)
    x = self._cache[path]
    return (x if layer is None else x[layer]).astype(dtype, copy=False)


# ---------------------------------------------------------------------------
# Writing.

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


def _write_shard(path: str, tensors, source) -> None:
  """Header, then each tensor made from the source and written after the previous one."""
  with open(path, "wb") as f:
    f.write(safetensors_header((t.key, t.dtype, t.shape) for t in tensors))
    start = f.tell()
    for t in tensors:
      w = t.join([source.get(p.path, p.layer, t.dtype) for p in t.pieces])
      if tuple(w.shape) != t.shape or w.dtype != t.dtype:
        raise ExportError(f"{t.key}: made {w.dtype}{list(w.shape)}, planned "
                          f"{t.dtype}{list(t.shape)}")
      w = np.ascontiguousarray(w)
      f.write(memoryview(w.reshape(-1).view(np.uint8)))
      if f.tell() - start != t.offset + t.nbytes:
        raise ExportError(f"{path}: {t.key} did not land at its planned offset")
      del w


def out_problem(out_dir: str, overwrite: bool) -> str | None:
  """What stops writing an export to out_dir (None: nothing)."""
  if not out_dir:
    return "--out is not set (the folder the export is written to)"
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    return f"--out={out_dir} exists and is not a folder"
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      return f"--out={out_dir} exists and is not empty (pass --overwrite to replace it)"
    if not os.path.exists(os.path.join(out_dir, INDEX)):
      return (f"--out={out_dir} is not empty and holds no earlier export ({INDEX}); "
              f"refusing to replace it")
  return None


def planned(shapes: dict, dtype=None) -> list:
  """`plan` with each tensor's output dtype set (dtype None: its leaf's own)."""
  tensors = plan(shapes)
  for t in tensors:
    t.dtype = out_dtype(dtype) or shapes[t.pieces[0].path][1]
    if t.dtype not in _ST_DTYPES:
      raise ExportError(f"{t.key}: dtype {t.dtype} cannot be exported (float32, bfloat16, "
                        f"float16)")
  return tensors


def export(source, cfg: ModelConfig, out_dir: str, dtype=None,
           shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_dir: str | None = None,
           base_config: dict | None = None, overwrite: bool = False, log=None) -> dict:
  """Writes the source's parameters to out_dir in the released layout (module docstring).

  source: `TreeLeaves` / `OrbaxLeaves`; dtype: the output dtype (float32 | bfloat16 |
  float16; None: each parameter's own); base_config: a config.json dict whose other
  fields are kept (e.g. the imported checkpoint's). Written into `out_dir.partial`
  and renamed when complete. -> the index dict."""
  problem = out_problem(out_dir, overwrite)
  if problem:
    raise ExportError(problem)
  if cfg.query.variant != "official":
    raise ExportError(f"the released layout holds the official query transformer; this "
                      f"model's variant is {cfg.query.variant!r}")
  tensors = planned(source.shapes, dtype)
  source.plan([p.path for t in tensors for p in t.pieces],
              {p.path: t.dtype for t in tensors for p in t.pieces})
  shards = shard(tensors, shard_bytes)
  if log:
    log(f"{len(tensors)} tensors, {sum(t.nbytes for t in tensors) / 2**30:.2f} GiB in "
        f"{len(shards)} shard(s)")
  tmp = out_dir.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  weight_map = {}
  for k, group in enumerate(shards):
    name = shard_name(k, len(shards))
    _write_shard(os.path.join(tmp, name), group, source)
    weight_map.update({t.key: name for t in group})
    if log:
      log(f"wrote {name}: {len(group)} tensors, {sum(t.nbytes for t in group) / 2**30:.2f} GiB")
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
           "weight_map": dict(sorted(weight_map.items()))}
  with open(os.path.join(tmp, INDEX), "w") as f:
    json.dump(index, f, indent=2)
  dtypes = {_ST_DTYPES[t.dtype] for t in tensors}
  torch_dtype = _TORCH_DTYPES[dtypes.pop()] if len(dtypes) == 1 else "float32"
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_config(cfg, torch_dtype, base_config), f, indent=2)
  if tokenizer_dir:
    copy_tokenizer(tokenizer_dir, tmp)
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return index


# ---------------------------------------------------------------------------
# config.json and the tokenizer.

_MODEL_FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size",
                 "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "torch_dtype",
                 "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature")


def hf_config(cfg: ModelConfig, torch_dtype: str, base: dict | None = None) -> dict:
  """config.json: `convert.released_config(cfg)` (LLaMA fields, LLaVA's mm_* fields), with
  `base`'s other fields kept (e.g. the imported checkpoint's), and what the released
  file leaves to code: CLIP's config (its heads and eps), the query count and heads."""
  derived = convert.released_config(cfg, torch_dtype)
  out = {**derived, **(base or {})}
  out.update({k: derived[k] for k in _MODEL_FIELDS})
  out.update({"mm_vision_config": clip_config(cfg.vision),
              "mm_num_queries": cfg.query.num_queries, "mm_query_heads": cfg.query.heads})
  return out


def clip_config(v) -> dict:
  """VisionConfig -> an HF CLIPVisionConfig dict (convert.vision_config_from_hf's input)."""
  return {"model_type": "clip_vision_model", "image_size": v.image_size,
          "patch_size": v.patch_size, "hidden_size": v.width, "num_hidden_layers": v.depth,
          "num_attention_heads": v.heads, "intermediate_size": v.mlp_dim,
          "layer_norm_eps": v.ln_eps, "num_channels": v.channels, "hidden_act": "quick_gelu"}


def copy_tokenizer(src_dir: str, out_dir: str) -> list:
  """Copies the tokenizer files found in src_dir; writes a minimal tokenizer_config.json
  (LlamaTokenizer, legacy as data/tokenizer.py reads it) when only tokenizer.model is
  there. -> the names written."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  if "tokenizer.model" not in names:
    raise ExportError(f"tokenizer folder {src_dir} holds no tokenizer.model")
  for n in names:
    shutil.copyfile(os.path.join(src_dir, n), os.path.join(out_dir, n))
  if "tokenizer_config.json" not in names:
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump(_tokenizer_config(os.path.join(src_dir, "tokenizer.model")), f, indent=2)
    names.append("tokenizer_config.json")
  return names


def _tokenizer_config(model_path: str) -> dict:
  from data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.Tokenizer.load(model_path, legacy=True)
  piece = lambda i: tok.id_to_piece(i) if i >= 0 else None
  return {"tokenizer_class": "LlamaTokenizer", "legacy": tok.legacy,
          "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
          "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id) or piece(tok.unk_id),
          "add_bos_token": True, "add_eos_token": False, "padding_side": "right"}


# ---------------------------------------------------------------------------
# export.py: an orbax checkpoint of a workdir, or the HF weights config.init names.

def _folder(path: str) -> str:
  return path if os.path.isdir(path) else os.path.dirname(path)


_NO_TOKENIZER = "no tokenizer.model found (set --config.tokenizer_path): none written"


def tokenizer_folder(config, workdir: str, hf_path: str | None = None) -> str | None:
  """Where the tokenizer files come from: the HF checkpoint's folder when it holds a
  tokenizer.model, else config.tokenizer_path's folder, else the built-in tokenizer's."""
  from mqt import train  # pylint: disable=import-outside-toplevel
  candidates = [_folder(hf_path)] if hf_path else []
  if config.tokenizer_path:
    candidates.append(os.path.dirname(os.path.abspath(config.tokenizer_path)))
  elif config.eval.data.kind == "builtin":
    candidates.append(os.path.dirname(train.tokenizer_path(config, config.eval.data, workdir)))
  return next((c for c in candidates if os.path.isfile(os.path.join(c, "tokenizer.model"))),
              None)


def check_shapes(shapes: dict, cfg: ModelConfig, where: str) -> None:
  """The checkpoint's leaves are the config's, shape for shape (else one line naming both)."""
  want = flat_shapes(unbox_abstract(abstract_params(cfg))["params"])
  for path in sorted(set(want) | set(shapes)):
    if path not in shapes:
      raise ExportError(f"{where} lacks parameter {path}, which the config's model has")
    if path not in want:
      raise ExportError(f"{where} has parameter {path}, which the config's model lacks")
    if want[path][0] != shapes[path][0]:
      raise ExportError(f"{where}: parameter {path} has shape {list(shapes[path][0])}, the "
                        f"config's model {list(want[path][0])} (export with the config it "
                        f"was trained with)")


def run(config, workdir: str, out_dir: str, checkpoint: str = "", dtype=None,
        shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, log=print,
        dry_run: bool = False) -> dict | None:
  """export.py: writes the latest checkpoint in `checkpoint` (default: the last stage of
  workdir), or with checkpoint="hf" the weights config.init.mqt_llava names (imported,
  then exported), to out_dir. Every path is checked before any weight is read; dry_run
  stops there and prints what would be written and the host memory it needs."""
  from mqt import inference  # pylint: disable=import-outside-toplevel
  problem = out_problem(out_dir, overwrite)
  if problem:
    raise ExportError(problem)
  if checkpoint == "hf":
    return _run_hf(config, workdir, out_dir, dtype, shard_bytes, overwrite, log, dry_run)
  model_cfg = ModelConfig.from_config(config.model)
  folder = checkpoint or inference.default_checkpoint(config, workdir)
  if not os.path.isdir(folder):
    raise ExportError(f"checkpoint folder {folder} does not exist (train first with "
                      f"python train.py --workdir=..., or pass --checkpoint=DIR or =hf)")
  source = OrbaxLeaves(folder)
  check_shapes(source.shapes, model_cfg, f"checkpoint {folder} (step {source.step})")
  if dry_run:
    largest = max(source.shapes, key=lambda p: _nbytes(*source.shapes[p]))
    shape, saved = source.shapes[largest]
    return _describe(planned(source.shapes, dtype), shard_bytes, out_dir,
                     _nbytes(shape, saved) + _nbytes(shape, out_dtype(dtype) or saved),
                     f"its largest leaf {largest}, read and cast", log)
  tok = tokenizer_folder(config, workdir)
  log(f"exporting {folder} step {source.step} to {out_dir}")
  if tok is None:
    log(_NO_TOKENIZER)
  return export(source, model_cfg, out_dir, dtype, shard_bytes, tok,
                {"mm_vision_tower": config.init.clip} if config.init.clip else None,
                overwrite, log)


def _describe(tensors, shard_bytes, out_dir, need, what, log) -> None:
  """A dry run's report: what would be written, and the host memory it needs."""
  gib = mem_lib.format_bytes
  shards = shard(tensors, shard_bytes)
  available = mem_lib.host_available_bytes()
  fits = ("" if available is None else
          f"; this host has {gib(available)} available: "
          f"{'fits' if need <= available else 'does NOT fit'}")
  log(f"dry run: would write {len(tensors)} tensors, {gib(sum(t.nbytes for t in tensors))} "
      f"({', '.join(sorted({_TORCH_DTYPES[_ST_DTYPES[t.dtype]] for t in tensors}))}) in "
      f"{len(shards)} shard(s) to {out_dir}; host memory about {gib(need)} ({what}){fits}")


def _run_hf(config, workdir, out_dir, dtype, shard_bytes, overwrite, log, dry_run=False):
  """Import (streaming, into the config's mesh) then export."""
  path = config.init.mqt_llava
  if not path:
    raise ExportError("--checkpoint=hf exports the weights --config.init.mqt_llava names; "
                      "it is not set")
  for field in ("mqt_llava", "clip"):
    if config.init[field] and not os.path.exists(config.init[field]):
      raise ExportError(f"--config.init.{field}={config.init[field]} does not exist")
  model_cfg = convert.model_config_for_checkpoint(config, log=log)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  rules = tuple(config.sharding.logical_axis_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = abstract_params(model_cfg)["params"]
    shardings = shard_lib.param_shardings(boxed, mesh, rules)
    if dry_run:
      shapes = flat_shapes(unbox_abstract(boxed))
      return _describe(planned(shapes, dtype), shard_bytes, out_dir,
                       convert.params_bytes(model_cfg, shardings=shardings) +
                       convert.HEADROOM_BYTES,
                       f"the imported tree in {model_cfg.llm.param_dtype} + headroom", log)
    convert.check_host_memory(model_cfg, shardings=shardings, what=f"the parameters of {path}")
    log(f"importing {path}")
    params = convert.import_mqt_llava(path, model_cfg, clip_path=config.init.clip or None,
                                      shardings=shardings)
  tok = tokenizer_folder(config, workdir, path)
  log(f"exporting to {out_dir}")
  if tok is None:
    log(_NO_TOKENIZER)
  return export(TreeLeaves(params), model_cfg, out_dir, dtype, shard_bytes, tok,
                convert.read_hf_config(path), overwrite, log)


# ---------------------------------------------------------------------------
# Checking an export against its source, tensor by tensor.

def compare(source_dir: str, export_dir: str, rel_tol: float = 0.0, cast=None) -> dict:
  """Streams two HF checkpoints: the same keys and shapes, and |a - b| <= rel_tol * |a|
  for every element (0: equal values in float32; bfloat16 rounding of a source value:
  rel_tol = 2**-8). cast (a dtype): also count the tensors whose exported values are
  bitwise the source's cast once to it. -> {"tensors", "elements", "max_rel",
  "cast_equal", "problems": [...]} (problems empty when they match)."""
  a, b = TensorSource(source_dir), TensorSource(export_dir)
  problems = [f"missing in export: {k}" for k in sorted(set(a.keys()) - set(b.keys()))]
  problems += [f"not in source: {k}" for k in sorted(set(b.keys()) - set(a.keys()))]
  n = elements = cast_equal = 0
  max_rel = 0.0
  for k in sorted(set(a.keys()) & set(b.keys())):
    if tuple(a.shape(k)) != tuple(b.shape(k)):
      problems.append(f"{k}: shape {list(b.shape(k))}, source {list(a.shape(k))}")
      continue
    x, y = a.get(k).reshape(-1), b.get(k).reshape(-1)
    bad, same = 0, True
    for i in range(0, x.size, 2**22):
      xs, ys = x[i:i + 2**22].astype(np.float32), y[i:i + 2**22].astype(np.float32)
      err, scale = np.abs(xs - ys), np.abs(xs)
      bad += int(np.sum(~(err <= rel_tol * scale)))
      max_rel = max(max_rel, float(np.max(err / np.maximum(scale, np.finfo(np.float32).tiny),
                                          initial=0.0)))
      same = same and cast is not None and np.array_equal(
          xs.astype(out_dtype(cast)).astype(np.float32), ys)
    if bad:
      problems.append(f"{k}: {bad} of {x.size} values differ by more than {rel_tol} relative")
    n, elements, cast_equal = n + 1, elements + x.size, cast_equal + int(same)
    del x, y
  return {"tensors": n, "elements": elements, "max_rel": max_rel, "cast_equal": cast_equal,
          "problems": problems}


def parse_size(text: str) -> int:
  """'5GB' (10**9), '500MiB' (2**20), '123' (bytes) -> bytes."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", str(text), re.IGNORECASE)
  if not m:
    raise ExportError(f"--max_shard_size={text!r}: a size such as 5GB, 500MiB or 123456")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  return int(float(m.group(1)) * base ** ("BKMGT".index(unit[0])))
