"""Writing an export: safetensors shards, their index, config.json and the tokenizer.

`export(source, cfg, out_dir)` writes

  model-0000k-of-0000n.safetensors  shards of at most `shard_bytes` (a larger tensor alone)
  model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map": {key: shard}}
  config.json                       LLaMA fields, LLaVA's mm_* fields, the query count
  tokenizer.model, ...              copied from a tokenizer folder (`copy_tokenizer`)

Streaming: the shard headers are computed from shapes first (mqt/export_plan.py); then
one HF tensor at a time is read from the source (mqt/export_sources.py: one leaf, or
one layer of a scanned [L, ...] leaf), cast to the output dtype, converted and written
after the previous one.
"""
import json
import os
import shutil

import numpy as np

from data import tokenizer as tokenizer_lib
from mqt.checkpoint_io import safetensors_header
from mqt.export_plan import ST_DTYPES, TORCH_DTYPES, ExportError, planned, shard, shard_name
from mqt.hf_config import clip_config, released_config
from mqt.model import ModelConfig

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json", "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 10**9  # HF's "5GB".


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
  dtypes = {ST_DTYPES[t.dtype] for t in tensors}
  torch_dtype = TORCH_DTYPES[dtypes.pop()] if len(dtypes) == 1 else "float32"
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
  """config.json: `released_config(cfg)` (LLaMA fields, LLaVA's mm_* fields), with
  `base`'s other fields kept (e.g. the imported checkpoint's), and what the released
  file leaves to code: CLIP's config (its heads and eps), the query count and heads."""
  derived = released_config(cfg, torch_dtype)
  out = {**derived, **(base or {})}
  out.update({k: derived[k] for k in _MODEL_FIELDS})
  out.update({"mm_vision_config": clip_config(cfg.vision),
              "mm_num_queries": cfg.query.num_queries, "mm_query_heads": cfg.query.heads})
  return out


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
  tok = tokenizer_lib.Tokenizer.load(model_path, legacy=True)
  piece = lambda i: tok.id_to_piece(i) if i >= 0 else None
  return {"tokenizer_class": "LlamaTokenizer", "legacy": tok.legacy,
          "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
          "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id) or piece(tok.unk_id),
          "add_bos_token": True, "add_eos_token": False, "padding_side": "right"}

