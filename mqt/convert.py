"""Import HF weights (CLIP vision, LLaMA, MQT-LLaVA) into our parameter tree.

The rule tables (mqt/convert_rules.py) say which checkpoint tensor makes each of our
parameters. Every expected parameter must come from a key of the right shape, and
every key of the checkpoint must be used (or be a known buffer): anything else is a
`CheckpointError` naming the key and the file. All of that, and the host memory the
parameters need (CPU backend: mqt/host_memory.py), is checked from the headers before
any tensor is read. Import then streams: one leaf at a time (a scanned stack: its L
layer tensors into one buffer of the target dtype), each placed straight into its
sharded device buffers (`jax.make_array_from_callback`).

The architecture comes from the checkpoint (mqt/hf_config.py:
`model_config_for_checkpoint`: config.json and tensor shapes over config.model's
defaults). This module also gives the names of those modules that callers use
(`convert.model_config_for_checkpoint`, `convert.check_host_memory`, ...).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mqt.checkpoint_io import CheckpointError, TensorSource
from mqt.convert_rules import (IGNORED, LLAVA_CLIP, LLAVA_QUERY, Leaf, Part, checkpoint_layout,
                               clip_prefix, clip_rules, expected_params, hf_shape, llama_rules,
                               official_query_rules, plan_component)
from mqt.decoder import LlamaConfig, LlamaDecoder
from mqt.hf_config import (
    llama_config_from_hf, model_config_for_checkpoint, read_hf_config, released_config,
    vision_config_from_hf)
from mqt.host_memory import (
    HEADROOM_BYTES, HostMemoryError, check_host_memory, check_plans, component_dtype,
    params_bytes)
from mqt.model import ModelConfig, unbox_abstract
from mqt.query_transformer import QueryConfig, make_query_transformer
from mqt.vision import VisionConfig, VisionTower

__all__ = [  # The import API, and what callers reach through here of the modules above.
    "HEADROOM_BYTES", "HostMemoryError", "check_host_memory", "checkpoint_layout",
    "expected_llm", "expected_query", "expected_vision", "import_clip_vision", "import_llama",
    "import_mqt_llava", "import_official_query", "llama_config_from_hf",
    "model_config_for_checkpoint", "params_bytes", "read_hf_config", "released_config",
    "vision_config_from_hf"]


class _Reader:
  """Plans components against one source (every key and shape checked, nothing read)
  and tracks which checkpoint keys the plans use."""

  def __init__(self, source: TensorSource):
    self.source = source
    self.used = set()

  def plan(self, rules, expected: dict, prefix: str = "", scanned: bool = False) -> dict:
    plan = plan_component(rules, expected, prefix, scanned)
    for leaf in plan.values():
      for part in leaf.parts:
        if part.key not in self.source:
          raise CheckpointError(f"missing key {part.key} (for parameter {part.label}) in "
                                f"{self.source.name}")
        if tuple(self.source.shape(part.key)) != hf_shape(part.hook, leaf.part_shape):
          raise _shape_error(self.source, part, leaf.part_shape)
        self.used.add(part.key)
    return plan

  def check_all_used(self, prefixes=("",)):
    extra = sorted(k for k in self.source.keys()
                   if k not in self.used and not IGNORED.search(k)
                   and any(k.startswith(p) for p in prefixes))
    if extra:
      shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
      raise CheckpointError(f"unexpected key(s) in {self.source.name}: {shown}")


def _shape_error(source, part: Part, shape) -> CheckpointError:
  return CheckpointError(
      f"key {part.key} in {source.name} has shape {tuple(source.shape(part.key))}, "
      f"which does not fit parameter {part.label} of shape {tuple(shape)}")


# --------------------------------------------------------------------------
# Streaming: one leaf at a time, straight into its device buffers.

def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """An uninitialized array whose data is `align`-byte aligned: the CPU backend then
  takes it as a device buffer without copying."""
  dtype = np.dtype(jnp.dtype(dtype))
  n = math.prod(shape) * dtype.itemsize
  raw = np.empty(n + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + n].view(dtype).reshape(shape)


def _load_leaf(source: TensorSource, leaf: Leaf, dtype, sharding) -> jax.Array:
  """Reads the leaf's tensors one by one into one host buffer of `dtype` (a scanned
  stack: its L layers), then places it with `sharding`. On a single CPU device the
  buffer becomes the device buffer (no copy); elsewhere it is freed once placed."""
  buf = _aligned_empty(leaf.shape, dtype)
  for part in leaf.parts:
    w = part.hook(source.get(part.key))
    if tuple(w.shape) != leaf.part_shape:
      raise _shape_error(source, part, leaf.part_shape)
    if part.index is None:
      buf[...] = w
    else:
      buf[part.index] = w
    del w
  return jax.make_array_from_callback(leaf.shape, sharding, lambda index: buf[index])


def _stream(source: TensorSource, plan: dict, dtype, shardings=None) -> dict:
  """A planned component -> nested dict of jax arrays of `dtype`, each leaf placed with
  its sharding (`shardings`: a tree like the component; None: the default device)."""
  flat_sh = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else None
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = {}
  for path, leaf in plan.items():
    if flat_sh is not None and path not in flat_sh:
      raise ValueError(f"shardings have no entry for parameter {path}")
    out[path] = _load_leaf(source, leaf, dtype, flat_sh[path] if flat_sh is not None else default)
  return traverse_util.unflatten_dict(out, sep="/")


def _read(source: TensorSource, plan: dict, dtype, shardings, what: str) -> dict:
  """One planned component, once the host memory it needs is checked (`what`: for the
  message, e.g. "the LLM")."""
  check_plans([(plan, shardings)], dtype, shardings, f"{what} of {source.name}")
  return _stream(source, plan, dtype, shardings)


# --------------------------------------------------------------------------
# The import functions.
#
# param_dtype: the dtype of the imported parameters, "float32" (exact) or "bfloat16"
# (half the memory; values rounded once from the checkpoint's). None: the config's own
# `param_dtype`. shardings: a tree of NamedSharding like the returned parameters (from
# `mqt.sharding.param_shardings`); None: every leaf on the default device. The
# checkpoint's keys and shapes are all checked, and the host memory the parameters need
# (CPU backend), before any tensor is read; tensors are then read one at a time.


def _abstract(module, *args):
  return unbox_abstract(jax.eval_shape(lambda: module.init(jax.random.key(0), *args)))["params"]


def expected_vision(v: VisionConfig):
  return _abstract(VisionTower(v), jnp.zeros((1, v.image_size, v.image_size, v.channels)))


def expected_llm(c: LlamaConfig):
  return _abstract(LlamaDecoder(c), jnp.zeros((1, 1, c.width)), jnp.zeros((1, 1), jnp.int32),
                   jnp.ones((1, 1, 1), bool))


def _plan_clip(source: TensorSource, cfg: VisionConfig):
  """-> (reader, plan, prefix) for a CLIP vision checkpoint (keys with or without
  `vision_model.`)."""
  prefix = clip_prefix(source, ("vision_model.", ""))
  if prefix is None:
    raise CheckpointError(f"{source.name} holds no CLIP vision tower "
                          f"(no embeddings.patch_embedding.weight)")
  reader = _Reader(source)
  plan = reader.plan(clip_rules(), expected_vision(cfg), prefix)
  reader.check_all_used((prefix,) if prefix else ("",))
  return reader, plan


def import_clip_vision(path, cfg: VisionConfig, source: TensorSource | None = None, *,
                       param_dtype=None, shardings=None):
  """HF CLIPVisionModel (keys with or without `vision_model.`) -> params["vision"], jax
  arrays of `param_dtype` placed with `shardings` (see above)."""
  source = source or TensorSource(path)
  _, plan = _plan_clip(source, cfg)
  return _read(source, plan, param_dtype or cfg.param_dtype, shardings, "the vision tower")


def expected_query(c: QueryConfig, num_patches: int):
  return _abstract(make_query_transformer(c), jnp.zeros((1, num_patches, c.width)), 1)


def import_official_query(path, cfg: QueryConfig, num_patches: int, *, param_dtype=None,
                          shardings=None):
  """The official resampler's weights (bare or under `model.query_abstractor.`) ->
  params["query"], jax arrays of `param_dtype` placed with `shardings` (see above)."""
  source = TensorSource(path)
  prefix = LLAVA_QUERY if any(k.startswith(LLAVA_QUERY) for k in source.keys()) else ""
  reader = _Reader(source)
  plan = reader.plan(official_query_rules(), expected_query(cfg, num_patches), prefix)
  reader.check_all_used((prefix,))
  return _read(source, plan, param_dtype or cfg.param_dtype, shardings, "the query transformer")


def import_llama(path, cfg: LlamaConfig, *, param_dtype=None, shardings=None):
  """HF LlamaForCausalLM -> params["llm"], jax arrays of `param_dtype` placed with
  `shardings` (see above); a scanned stack is read layer by layer into one buffer."""
  source = TensorSource(path)
  reader = _Reader(source)
  plan = reader.plan(llama_rules(), expected_llm(cfg), "", cfg.scan_layers)
  reader.check_all_used()
  return _read(source, plan, param_dtype or cfg.param_dtype, shardings, "the LLM")


def import_mqt_llava(path, cfg: ModelConfig, clip_path=None, *, param_dtype=None,
                     shardings=None, components=None):
  """HF-format MQT-LLaVA checkpoint -> full params {"vision", "query", "llm"}: jax arrays
  of `param_dtype` placed with `shardings` (see above).

  The vision tower is read from the checkpoint when it holds one, else from
  `clip_path` (LLaVA releases often leave CLIP out); giving `clip_path` for a
  checkpoint that holds the tower is an error (it would not be used). The
  architecture must match `cfg`: `model_config_for_checkpoint` reads it from the
  checkpoint. `components` (e.g. ("vision", "query")): every tensor is still checked
  against the layout, but only those subtrees are read.
  """
  if cfg.query.variant != "official":
    raise CheckpointError(f"{path}: MQT-LLaVA checkpoints hold the official query "
                          f"transformer; the config asks for variant {cfg.query.variant!r}")
  source = TensorSource(path)
  expected = expected_params(cfg)
  reader = _Reader(source)
  sh = shardings if shardings is not None else {}
  plans = {"query": (source, reader.plan(official_query_rules(), expected["query"],
                                         LLAVA_QUERY)),
           "llm": (source, reader.plan(llama_rules(), expected["llm"], "",
                                       cfg.llm.scan_layers))}
  if clip_prefix(source, (LLAVA_CLIP,)):
    if clip_path is not None:
      raise CheckpointError(f"{source.name} holds the vision tower ({LLAVA_CLIP}*), so the "
                            f"CLIP checkpoint {clip_path} would not be used; leave it out "
                            f"(config.init.clip)")
    plans["vision"] = (source, reader.plan(clip_rules(), expected["vision"], LLAVA_CLIP))
  elif clip_path is not None:
    clip_source = TensorSource(clip_path)
    plans["vision"] = (clip_source, _plan_clip(clip_source, cfg.vision)[1])
  else:
    raise CheckpointError(f"{source.name} holds no vision tower "
                          f"({LLAVA_CLIP}*); pass the CLIP checkpoint as clip_path")
  reader.check_all_used()
  if components is not None:
    plans = {k: v for k, v in plans.items() if k in components}
  dtypes = {k: param_dtype or component_dtype(cfg, k) for k in plans}
  for dt in set(dtypes.values()):
    check_plans([(p, sh.get(k)) for k, (_, p) in plans.items() if dtypes[k] == dt], dt,
                shardings, f"the parameters of {source.name}")
  return {k: _stream(src, plan, dtypes[k], sh.get(k))
          for k, (src, plan) in sorted(plans.items())}
