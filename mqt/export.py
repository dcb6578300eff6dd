"""Export parameters to the released MQT-LLaVA layout (HF format), streaming.

Keys are the released checkpoint's: the LLM under HF LLaMA names, the query
transformer under `model.query_abstractor.`, the vision tower under
`model.vision_tower.vision_tower.vision_model.` (HF CLIPVisionModel names). The
mapping is the import's rule tables read backwards (mqt/export_plan.py); the files
written are mqt/export_write.py's (`export`), from a source of parameters
(mqt/export_sources.py: `TreeLeaves`, `OrbaxLeaves`).

Beside what the source already holds, the host holds one layer slice (`TreeLeaves`),
or one restore group of leaves (`OrbaxLeaves`: one leaf of the 7B is at most
[32, 4096, 11008], 5.4 GiB in float32), and one tensor in the output dtype.

This module is export.py's: `run` exports an orbax checkpoint of a workdir, or the HF
weights config.init names (imported, then exported); `compare` checks an export against
its source tensor by tensor. It also gives the names of the modules above that callers
use (`export.export`, `export.TreeLeaves`, `export.ExportError`, ...).
"""
import os
import re

import jax
import numpy as np
from flax import linen as nn

from mqt import convert
from mqt import memory as mem_lib
from mqt import run_inputs
from mqt import sharding as shard_lib
from mqt.checkpoint_io import TensorSource
from mqt.convert_rules import LLAVA_CLIP, LLAVA_QUERY
from mqt.export_plan import (ST_DTYPES, TORCH_DTYPES, ExportError, flat_shapes, nbytes_of,
                             out_dtype, plan, planned, shard)
from mqt.export_sources import OrbaxLeaves, TreeLeaves
from mqt.export_write import DEFAULT_SHARD_BYTES, export, out_problem
from mqt.model import ModelConfig, abstract_params, unbox_abstract

__all__ = [  # export.py's API, and what callers reach through here of the modules above.
    "DEFAULT_SHARD_BYTES", "LLAVA_CLIP", "LLAVA_QUERY", "ExportError", "OrbaxLeaves",
    "TreeLeaves", "check_shapes", "compare", "export", "flat_shapes", "out_dtype", "parse_size",
    "plan", "planned", "run", "tokenizer_folder"]


def _folder(path: str) -> str:
  return path if os.path.isdir(path) else os.path.dirname(path)


_NO_TOKENIZER = "no tokenizer.model found (set --config.tokenizer_path): none written"


def tokenizer_folder(config, workdir: str, hf_path: str | None = None) -> str | None:
  """Where the tokenizer files come from: the HF checkpoint's folder when it holds a
  tokenizer.model, else config.tokenizer_path's folder, else the built-in tokenizer's."""
  candidates = [_folder(hf_path)] if hf_path else []
  if config.tokenizer_path:
    candidates.append(os.path.dirname(os.path.abspath(config.tokenizer_path)))
  elif config.eval.data.kind == "builtin":
    candidates.append(os.path.dirname(
        run_inputs.tokenizer_path(config, config.eval.data, workdir)))
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
  problem = out_problem(out_dir, overwrite)
  if problem:
    raise ExportError(problem)
  if checkpoint == "hf":
    return _run_hf(config, workdir, out_dir, dtype, shard_bytes, overwrite, log, dry_run)
  model_cfg = ModelConfig.from_config(config.model)
  folder = checkpoint or run_inputs.default_checkpoint(config, workdir)
  if not os.path.isdir(folder):
    raise ExportError(f"checkpoint folder {folder} does not exist (train first with "
                      f"python train.py --workdir=..., or pass --checkpoint=DIR or =hf)")
  source = OrbaxLeaves(folder)
  check_shapes(source.shapes, model_cfg, f"checkpoint {folder} (step {source.step})")
  if dry_run:
    largest = max(source.shapes, key=lambda p: nbytes_of(*source.shapes[p]))
    shape, saved = source.shapes[largest]
    return _describe(planned(source.shapes, dtype), shard_bytes, out_dir,
                     nbytes_of(shape, saved) + nbytes_of(shape, out_dtype(dtype) or saved),
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
      f"({', '.join(sorted({TORCH_DTYPES[ST_DTYPES[t.dtype]] for t in tensors}))}) in "
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
