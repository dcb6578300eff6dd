"""Import HF weights (CLIP vision, LLaMA, MQT-LLaVA) into our parameter tree.

Conversion is data: each component has a table of rules
(our path, HF key, hook), `{i}` standing for a layer index; hooks transpose
torch Linear weights ([out, in] -> [in, out]), reorder the patch conv
([O, I, H, W] -> [H, W, I, O]) and split the packed `in_proj` of
`nn.MultiheadAttention`. Scanned decoder stacks are stacked along axis 0.

Every expected parameter must come from a key of the right shape, and every
key of the checkpoint must be used (or be a known buffer): anything else is a
`CheckpointError` naming the key and the file. All of that, and the host memory
the parameters need (CPU backend: `check_host_memory`), is checked from the
headers before any tensor is read. Import then streams: one leaf at a time (a
scanned stack: its L layer tensors into one buffer of the target dtype), each
placed straight into its sharded device buffers (`jax.make_array_from_callback`).

The architecture comes from the checkpoint (`model_config_for_checkpoint`:
config.json and tensor shapes over config.model's defaults), and the rule tables
give the released layout back (`checkpoint_layout`, `released_config`).
"""
import dataclasses
import json
import math
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mqt import memory as mem_lib
from mqt import paths
from mqt.checkpoint_io import CheckpointError, TensorSource
from mqt.decoder import LlamaConfig, LlamaDecoder
from mqt.model import ModelConfig, abstract_params, unbox_abstract
from mqt.query_transformer import QueryConfig, make_query_transformer
from mqt.vision import VisionConfig, VisionTower

Hook = Callable[[np.ndarray], np.ndarray]

_T: Hook = lambda w: w.T
_ID: Hook = lambda w: w
_CONV: Hook = lambda w: w.transpose(2, 3, 1, 0)


def _rows(part: int) -> Hook:
  def hook(w):
    d = w.shape[0] // 3
    piece = w[part * d:(part + 1) * d]
    return piece.T if w.ndim == 2 else piece
  hook.packed_part = part  # Which third of a packed [3d, ...] tensor (see `hf_shape`).
  return hook


def hf_shape(hook: Hook, shape) -> tuple:
  """The checkpoint shape that `hook` turns into our `shape` (its inverse, on shapes)."""
  shape = tuple(shape)
  if hook is _T:
    return shape[::-1]
  if hook is _CONV:
    h, w, i, o = shape
    return (o, i, h, w)
  if hasattr(hook, "packed_part"):  # ours [in, d] or [d] <- theirs [3d, in] or [3d].
    return (3 * shape[-1], *shape[:-1])
  return shape


def _linear(ours: str, theirs: str, bias: bool = True):
  rules = [(f"{ours}/kernel", f"{theirs}.weight", _T)]
  if bias:
    rules.append((f"{ours}/bias", f"{theirs}.bias", _ID))
  return rules


def _norm(ours: str, theirs: str, bias: bool = True):
  rules = [(f"{ours}/scale", f"{theirs}.weight", _ID)]
  if bias:
    rules.append((f"{ours}/bias", f"{theirs}.bias", _ID))
  return rules


def clip_rules():
  layer = "encoder.layers.{i}."
  return [
      ("patch_embedding/kernel", "embeddings.patch_embedding.weight", _CONV),
      ("class_embedding", "embeddings.class_embedding", _ID),
      ("position_embedding", "embeddings.position_embedding.weight", _ID),
      *_norm("pre_layrnorm", "pre_layrnorm"),
      *[r for n in ("q_proj", "k_proj", "v_proj", "out_proj")
        for r in _linear(f"layers_{{i}}/{n}", f"{layer}self_attn.{n}")],
      *_norm("layers_{i}/layer_norm1", f"{layer}layer_norm1"),
      *_norm("layers_{i}/layer_norm2", f"{layer}layer_norm2"),
      *_linear("layers_{i}/fc1", f"{layer}mlp.fc1"),
      *_linear("layers_{i}/fc2", f"{layer}mlp.fc2"),
      *_norm("post_layernorm", "post_layernorm"),
  ]


def llama_rules():
  layer = "model.layers.{i}."
  return [
      ("embed_tokens/embedding", "model.embed_tokens.weight", _ID),
      *[r for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        for r in _linear(f"layers_{{i}}/{n}", f"{layer}self_attn.{n}", bias=False)],
      *[r for n in ("gate_proj", "up_proj", "down_proj")
        for r in _linear(f"layers_{{i}}/{n}", f"{layer}mlp.{n}", bias=False)],
      *_norm("layers_{i}/input_layernorm", f"{layer}input_layernorm", bias=False),
      *_norm("layers_{i}/post_attention_layernorm", f"{layer}post_attention_layernorm",
             bias=False),
      *_norm("norm", "model.norm", bias=False),
      ("lm_head/kernel", "lm_head.weight", _T),
  ]


def official_query_rules():
  return [
      ("latents/query", "query", _ID),
      ("latents/pos_embed", "pos_embed", _ID),
      *[(f"{n}/{leaf}", f"attn.in_proj_{hf}", _rows(part))
        for part, n in enumerate(("q_proj", "k_proj", "v_proj"))
        for leaf, hf in (("kernel", "weight"), ("bias", "bias"))],
      *_linear("out_proj", "attn.out_proj"),
      *_norm("ln_q", "ln_q"), *_norm("ln_k", "ln_k"), *_norm("ln_v", "ln_v"),
      ("proj", "proj", _ID),
  ]


# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


@dataclasses.dataclass(frozen=True)
class Part:
  """One checkpoint tensor of a leaf: `hook(tensor)` is the whole leaf (index None) or
  its layer `index` (a scanned stack [L, ...])."""
  key: str
  hook: Hook
  index: int | None
  label: str  # Our parameter, for messages ("layers/q_proj/kernel[3]").


@dataclasses.dataclass(frozen=True)
class Leaf:
  shape: tuple  # The leaf's shape ([L, ...] for a scanned stack).
  parts: tuple  # Part, one per checkpoint tensor.

  @property
  def part_shape(self) -> tuple:
    return self.shape[1:] if self.parts[0].index is not None else self.shape


def plan_component(rules, expected: dict, prefix: str = "", scanned: bool = False) -> dict:
  """Which checkpoint tensors make each leaf: {our "a/b/c" path: Leaf}, in rule order.

  expected: the component's abstract tree (only shapes are used); nothing is read.
  A leaf that no rule covers is a CheckpointError."""
  flat = traverse_util.flatten_dict(expected, sep="/")
  plan = {}
  for ours, theirs, hook in rules:
    if "{i}" not in ours:
      if ours in flat:
        plan[ours] = Leaf(tuple(flat[ours].shape), (Part(prefix + theirs, hook, None, ours),))
    elif scanned:
      path = ours.replace("layers_{i}", "layers")
      if path in flat:
        shape = tuple(flat[path].shape)
        plan[path] = Leaf(shape, tuple(Part(prefix + theirs.format(i=i), hook, i, f"{path}[{i}]")
                                       for i in range(shape[0])))
    else:
      i = 0
      while ours.format(i=i) in flat:
        path = ours.format(i=i)
        plan[path] = Leaf(tuple(flat[path].shape),
                          (Part(prefix + theirs.format(i=i), hook, None, path),))
        i += 1
  missing = sorted(set(flat) - set(plan))
  if missing:
    raise CheckpointError(f"no conversion rule for parameter(s) {missing}")
  return plan


def checkpoint_layout(cfg: ModelConfig, with_vision: bool = True) -> dict:
  """The released MQT-LLaVA checkpoint's tensors: {key: shape}, in the released order
  (embeddings, decoder layers, final norm, vision tower, query transformer, lm_head),
  from the rule tables and abstract shapes; nothing is allocated. A packed tensor
  (the resampler's `in_proj`) appears once."""
  expected = _expected(cfg)
  llm = plan_component(llama_rules(), expected["llm"], "", cfg.llm.scan_layers)
  parts = [p for leaf in llm.values() for p in _with_shapes(leaf)]
  head = [x for x in parts if x[0].key == "lm_head.weight"]
  parts = [x for x in parts if x[0].key != "lm_head.weight"]
  if with_vision:
    parts += [p for leaf in plan_component(clip_rules(), expected["vision"],
                                           _LLAVA_CLIP).values() for p in _with_shapes(leaf)]
  parts += [p for leaf in plan_component(official_query_rules(), expected["query"],
                                         _LLAVA_QUERY).values() for p in _with_shapes(leaf)]
  layout = {}
  for part, shape in sorted(parts + head, key=lambda x: _release_order(x[0].key)):
    layout.setdefault(part.key, hf_shape(part.hook, shape))
  return layout


def _with_shapes(leaf: Leaf):
  return [(p, leaf.part_shape) for p in leaf.parts]


def _release_order(key: str):
  """HF's state-dict order: embeddings, layers by index, norm, towers, lm_head."""
  top = (0 if key.startswith("model.embed_tokens") else
         1 if key.startswith("model.layers.") else
         2 if key.startswith("model.norm") else
         3 if key.startswith("model.vision_tower") else
         4 if key.startswith("model.query_abstractor") else 5)
  layer = re.search(r"\.layers\.(\d+)\.", key)
  return (top, int(layer.group(1)) if layer else -1)


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
                   if k not in self.used and not _IGNORED.search(k)
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


# --------------------------------------------------------------------------
# Host memory, checked before anything is read.

class HostMemoryError(MemoryError):
  """The parameters would not fit this host's memory (CPU backend); nothing was read."""


HEADROOM_BYTES = 1 << 30  # The tensors in flight (one layer group), buffers, the runtime:
# 1 GiB, or an eighth of the tree when that is less (measured on the 7B in bfloat16: the
# peak resident memory of the whole import was 0.93 GiB above the tree).


def _host_bytes(shape, dtype, sharding) -> int:
  """Bytes a leaf takes in host memory once placed with `sharding` on CPU devices."""
  itemsize = jnp.dtype(dtype).itemsize
  if sharding is None:
    return math.prod(shape) * itemsize
  return math.prod(sharding.shard_shape(tuple(shape))) * itemsize * len(sharding.device_set)


def _on_cpu(shardings) -> bool:
  leaves = jax.tree.leaves(shardings) if shardings is not None else []
  devices = leaves[0].device_set if leaves else {jax.devices()[0]}
  return next(iter(devices)).platform == "cpu"


def check_host_bytes(nbytes: int, dtype, largest: int = 0, what: str = "the parameters",
                     shardings=None) -> None:
  """Raises HostMemoryError when `nbytes` of parameters in `dtype` (plus headroom, plus
  `largest`: a leaf staged on the host before it is split over several devices) exceed
  MemAvailable; only where parameters live in host memory (a CPU backend)."""
  if not _on_cpu(shardings):
    return
  available = mem_lib.host_available_bytes()
  need = nbytes + min(HEADROOM_BYTES, nbytes // 8) + largest
  if available is None or need <= available:
    return
  name = jnp.dtype(dtype).name
  fix = ("--param_dtype=bfloat16 (param_dtype='bfloat16') halves it" if name == "float32"
         else "use a host with more memory, or an accelerator")
  gib = mem_lib.format_bytes
  raise HostMemoryError(
      f"{what} in {name} need {gib(need)} of host memory ({gib(nbytes)} of parameters + "
      f"{gib(need - nbytes)} headroom) but this host has {gib(available)} available "
      f"(MemAvailable); {fix}")


def params_bytes(cfg: ModelConfig, param_dtype=None, shardings=None) -> int:
  """Host bytes of the whole parameter tree in `param_dtype` (None: the config's), from
  abstract shapes (`shardings`: count replicated leaves once per device)."""
  abstract = _expected(cfg)
  dtype_of = lambda path: param_dtype or _component_dtype(cfg, path[0])
  flat = traverse_util.flatten_dict(abstract)
  flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  return sum(_host_bytes(a.shape, dtype_of(k), flat_sh.get(k)) for k, a in flat.items())


def check_host_memory(cfg: ModelConfig, param_dtype=None, shardings=None,
                      what: str = "the parameters") -> None:
  """For commands: fails (HostMemoryError, one line naming the bytes needed, the bytes
  available and the flag that lowers it) before any weight is read or allocated, when
  the whole parameter tree in `param_dtype` would not fit this host's memory. Only on a
  CPU backend, where parameters live in host memory."""
  check_host_bytes(params_bytes(cfg, param_dtype, shardings),
                   param_dtype or cfg.llm.param_dtype, what=what, shardings=shardings)


def _component_dtype(cfg: ModelConfig, component: str):
  return {"vision": cfg.vision, "query": cfg.query, "llm": cfg.llm}[component].param_dtype


def _check_plans(plans, dtype, shardings, what):
  """plans: [(plan, shardings of that component or None)] -> check_host_bytes."""
  total = largest = 0
  for plan, sh in plans:
    flat_sh = traverse_util.flatten_dict(sh, sep="/") if sh is not None else {}
    for path, leaf in plan.items():
      s = flat_sh.get(path)
      total += _host_bytes(leaf.shape, dtype, s)
      if s is not None and len(s.device_set) > 1:
        largest = max(largest, _host_bytes(leaf.shape, dtype, None))
  check_host_bytes(total, dtype, largest, what, shardings)


# --------------------------------------------------------------------------
# The import functions.
#
# param_dtype: the dtype of the imported parameters, "float32" (exact) or "bfloat16"
# (half the memory; values rounded once from the checkpoint's). None: the config's own
# `param_dtype`. shardings: a tree of NamedSharding like the returned parameters (from
# `mqt.sharding.param_shardings`); None: every leaf on the default device. The
# checkpoint's keys and shapes are all checked, and the host memory the parameters need
# (CPU backend), before any tensor is read; tensors are then read one at a time.


def _expected(cfg: ModelConfig):
  return unbox_abstract(abstract_params(cfg))["params"]


def _abstract(module, *args):
  return unbox_abstract(jax.eval_shape(lambda: module.init(jax.random.key(0), *args)))["params"]


def expected_vision(v: VisionConfig):
  return _abstract(VisionTower(v), jnp.zeros((1, v.image_size, v.image_size, v.channels)))


def expected_llm(c: LlamaConfig):
  return _abstract(LlamaDecoder(c), jnp.zeros((1, 1, c.width)), jnp.zeros((1, 1), jnp.int32),
                   jnp.ones((1, 1, 1), bool))


def _clip_prefix(source: TensorSource, candidates) -> str:
  for p in candidates:
    if any(k.startswith(p + "embeddings.patch_embedding") for k in source.keys()):
      return p
  return None


def _plan_clip(source: TensorSource, cfg: VisionConfig):
  """-> (reader, plan, prefix) for a CLIP vision checkpoint (keys with or without
  `vision_model.`)."""
  prefix = _clip_prefix(source, ("vision_model.", ""))
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
  dtype = param_dtype or cfg.param_dtype
  _check_plans([(plan, shardings)], dtype, shardings, f"the vision tower of {source.name}")
  return _stream(source, plan, dtype, shardings)


def expected_query(c: QueryConfig, num_patches: int):
  return _abstract(make_query_transformer(c), jnp.zeros((1, num_patches, c.width)), 1)


def import_official_query(path, cfg: QueryConfig, num_patches: int, *, param_dtype=None,
                          shardings=None):
  """The official resampler's weights (bare or under `model.query_abstractor.`) ->
  params["query"], jax arrays of `param_dtype` placed with `shardings` (see above)."""
  source = TensorSource(path)
  prefix = _LLAVA_QUERY if any(k.startswith(_LLAVA_QUERY) for k in source.keys()) else ""
  reader = _Reader(source)
  plan = reader.plan(official_query_rules(), expected_query(cfg, num_patches), prefix)
  reader.check_all_used((prefix,))
  dtype = param_dtype or cfg.param_dtype
  _check_plans([(plan, shardings)], dtype, shardings, f"the query transformer of {source.name}")
  return _stream(source, plan, dtype, shardings)


def import_llama(path, cfg: LlamaConfig, *, param_dtype=None, shardings=None):
  """HF LlamaForCausalLM -> params["llm"], jax arrays of `param_dtype` placed with
  `shardings` (see above); a scanned stack is read layer by layer into one buffer."""
  source = TensorSource(path)
  reader = _Reader(source)
  plan = reader.plan(llama_rules(), expected_llm(cfg), "", cfg.scan_layers)
  reader.check_all_used()
  dtype = param_dtype or cfg.param_dtype
  _check_plans([(plan, shardings)], dtype, shardings, f"the LLM of {source.name}")
  return _stream(source, plan, dtype, shardings)


_LLAVA_CLIP = "model.vision_tower.vision_tower.vision_model."
_LLAVA_QUERY = "model.query_abstractor."


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
  expected = _expected(cfg)
  reader = _Reader(source)
  sh = shardings if shardings is not None else {}
  plans = {"query": (source, reader.plan(official_query_rules(), expected["query"],
                                         _LLAVA_QUERY)),
           "llm": (source, reader.plan(llama_rules(), expected["llm"], "",
                                       cfg.llm.scan_layers))}
  if _clip_prefix(source, (_LLAVA_CLIP,)):
    if clip_path is not None:
      raise CheckpointError(f"{source.name} holds the vision tower ({_LLAVA_CLIP}*), so the "
                            f"CLIP checkpoint {clip_path} would not be used; leave it out "
                            f"(config.init.clip)")
    plans["vision"] = (source, reader.plan(clip_rules(), expected["vision"], _LLAVA_CLIP))
  elif clip_path is not None:
    clip_source = TensorSource(clip_path)
    plans["vision"] = (clip_source, _plan_clip(clip_source, cfg.vision)[1])
  else:
    raise CheckpointError(f"{source.name} holds no vision tower "
                          f"({_LLAVA_CLIP}*); pass the CLIP checkpoint as clip_path")
  reader.check_all_used()
  if components is not None:
    plans = {k: v for k, v in plans.items() if k in components}
  dtypes = {k: param_dtype or _component_dtype(cfg, k) for k in plans}
  for dt in set(dtypes.values()):
    _check_plans([(p, sh.get(k)) for k, (_, p) in plans.items() if dtypes[k] == dt], dt,
                 shardings, f"the parameters of {source.name}")
  return {k: _stream(src, plan, dtypes[k], sh.get(k))
          for k, (src, plan) in sorted(plans.items())}



# --------------------------------------------------------------------------
# Architecture from HF config.json dictionaries.

def vision_config_from_hf(hf: dict, **overrides) -> VisionConfig:
  """HF CLIPVisionConfig (or a CLIPConfig's `vision_config`) dict -> VisionConfig."""
  hf = hf.get("vision_config", hf)
  if hf.get("hidden_act", "quick_gelu") != "quick_gelu":
    raise CheckpointError(f"CLIP hidden_act {hf['hidden_act']!r} is not supported (quick_gelu)")
  return VisionConfig(**{**dict(
      image_size=hf["image_size"], patch_size=hf["patch_size"], width=hf["hidden_size"],
      depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], ln_eps=hf.get("layer_norm_eps", 1e-5),
      channels=hf.get("num_channels", 3)), **overrides})


def llama_config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """HF LlamaConfig dict -> LlamaConfig (rope_theta old- or new-style)."""
  theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
  rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get(
      "rope_type", "default")
  if rope_type != "default":
    raise CheckpointError(f"rope_type {rope_type!r} is not supported (default)")
  if hf.get("tie_word_embeddings") or hf.get("attention_bias") or hf.get("mlp_bias"):
    raise CheckpointError("tied embeddings and biased LLaMA variants are not supported")
  heads = hf["num_attention_heads"]
  return LlamaConfig(**{**dict(
      vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
      heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], rms_eps=hf["rms_norm_eps"], rope_theta=float(theta)),
      **overrides})


def released_config(cfg: ModelConfig, torch_dtype: str = "float16") -> dict:
  """The `config.json` of a released-layout checkpoint of `cfg`: HF LlamaConfig fields,
  LLaVA's mm_* fields and architectures ["LlavaLlamaForCausalLM"] (what
  `model_config_for_checkpoint` reads back)."""
  llm, v = cfg.llm, cfg.vision
  return {
      "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
      "vocab_size": llm.vocab_size, "hidden_size": llm.width,
      "intermediate_size": llm.mlp_dim, "num_hidden_layers": llm.depth,
      "num_attention_heads": llm.heads, "num_key_value_heads": llm.kv_heads,
      "head_dim": llm.head_dim, "rms_norm_eps": llm.rms_eps, "rope_theta": llm.rope_theta,
      "rope_scaling": None, "hidden_act": "silu", "max_position_embeddings": 4096,
      "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False,
      "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
      "pad_token_id": 0, "torch_dtype": torch_dtype, "transformers_version": "4.31.0",
      "use_cache": True, "image_aspect_ratio": "pad", "freeze_mm_mlp_adapter": False,
      "tune_mm_mlp_adapter": False, "mm_use_im_patch_token": False,
      "mm_use_im_start_end": False, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
      "mm_hidden_size": v.width, "mm_vision_select_layer": v.select_layer,
      "mm_vision_select_feature": "cls_patch" if v.keep_cls else "patch",
      "mm_query_abstractor_type": "matry_query", "use_mm_proj": True,
  }


# --------------------------------------------------------------------------
# The architecture from the checkpoint: config.json and tensor shapes override and
# validate config.model's defaults.

_LLAMA_FIELDS = (("vocab_size", "vocab_size"), ("width", "hidden_size"),
                 ("depth", "num_hidden_layers"), ("heads", "num_attention_heads"),
                 ("kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
                 ("mlp_dim", "intermediate_size"), ("rms_eps", "rms_norm_eps"),
                 ("rope_theta", "rope_theta"))
_CLIP_FIELDS = (("image_size", "image_size"), ("patch_size", "patch_size"),
                ("width", "hidden_size"), ("depth", "num_hidden_layers"),
                ("heads", "num_attention_heads"), ("mlp_dim", "intermediate_size"),
                ("ln_eps", "layer_norm_eps"), ("channels", "num_channels"))
_SELECT_FEATURE = {"patch": False, "cls_patch": True}


def read_hf_config(path) -> dict | None:
  """The `config.json` of the checkpoint at `path` (a folder, or a file in one); None
  where there is none."""
  path = os.fspath(path)
  folder = path if paths.isdir(path) else paths.dirname(path)
  name = paths.join(folder, "config.json")
  if not paths.isfile(name):
    return None
  try:
    with paths.open(name) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{name}: not valid JSON ({e})") from None


class _Facts:
  """What a checkpoint records: {"llm.depth": (value, where)}; two sources that
  disagree are a CheckpointError naming both."""

  def __init__(self):
    self.items = {}

  def add(self, field: str, value, where: str):
    if field in self.items and self.items[field][0] != value:
      old, old_where = self.items[field]
      raise CheckpointError(f"the checkpoint contradicts itself on {field}: {old_where} says "
                            f"{old}, {where} says {value}")
    self.items.setdefault(field, (value, where))


def _layer_count(source: TensorSource, prefix: str) -> int:
  rx = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for k in source.keys() if (m := rx.match(k))}
  return max(found) + 1 if found else 0


def _llm_facts(facts: _Facts, source: TensorSource, hf: dict | None, name: str):
  if hf is not None:
    llama = llama_config_from_hf(hf)  # Also refuses unsupported LLaMA variants.
    for ours, theirs in _LLAMA_FIELDS:
      facts.add(f"llm.{ours}", getattr(llama, ours), f"{name}/config.json {theirs}")
  embed = "model.embed_tokens.weight"
  if embed in source:
    vocab, width = source.shape(embed)
    facts.add("llm.vocab_size", vocab, f"{embed} {source.shape(embed)}")
    facts.add("llm.width", width, f"{embed} {source.shape(embed)}")
  depth = _layer_count(source, "model.layers.")
  if depth:
    facts.add("llm.depth", depth, f"{source.name}: model.layers.0-{depth - 1}")
  gate = "model.layers.0.mlp.gate_proj.weight"
  if gate in source:
    facts.add("llm.mlp_dim", source.shape(gate)[0], f"{gate} {source.shape(gate)}")


def _vision_facts(facts: _Facts, source: TensorSource, prefix: str, hf: dict | None,
                  name: str):
  if hf is not None:
    clip = vision_config_from_hf(hf)
    for ours, theirs in _CLIP_FIELDS:
      facts.add(f"vision.{ours}", getattr(clip, ours), f"{name}/config.json {theirs}")
  conv = prefix + "embeddings.patch_embedding.weight"
  if conv in source:
    width, channels, patch, _ = source.shape(conv)
    for field, value in (("width", width), ("channels", channels), ("patch_size", patch)):
      facts.add(f"vision.{field}", value, f"{conv} {source.shape(conv)}")
    pos = prefix + "embeddings.position_embedding.weight"
    if pos in source:
      facts.add("vision.image_size", math.isqrt(source.shape(pos)[0] - 1) * patch,
                f"{pos} {source.shape(pos)} with patch {patch}")
  depth = _layer_count(source, prefix + "encoder.layers.")
  if depth:
    facts.add("vision.depth", depth, f"{source.name}: {prefix}encoder.layers.0-{depth - 1}")
  fc1 = prefix + "encoder.layers.0.mlp.fc1.weight"
  if fc1 in source:
    facts.add("vision.mlp_dim", source.shape(fc1)[0], f"{fc1} {source.shape(fc1)}")


def _llava_facts(facts: _Facts, hf: dict | None, name: str):
  if hf is None:
    return
  where = f"{name}/config.json"
  if "mm_vision_select_layer" in hf:
    facts.add("vision.select_layer", int(hf["mm_vision_select_layer"]),
              f"{where} mm_vision_select_layer")
  feature = hf.get("mm_vision_select_feature")
  if feature is not None:
    if feature not in _SELECT_FEATURE:
      raise CheckpointError(f"{where}: mm_vision_select_feature {feature!r} is not supported "
                            f"({' | '.join(_SELECT_FEATURE)})")
    facts.add("vision.keep_cls", _SELECT_FEATURE[feature], f"{where} mm_vision_select_feature")
  if "mm_hidden_size" in hf:
    facts.add("vision.width", int(hf["mm_hidden_size"]), f"{where} mm_hidden_size")
  # What the released file leaves to code, written by export.py: CLIP's own config and
  # the resampler's query count and heads.
  if isinstance(hf.get("mm_vision_config"), dict):
    clip = vision_config_from_hf(hf["mm_vision_config"])
    for ours, theirs in _CLIP_FIELDS:
      facts.add(f"vision.{ours}", getattr(clip, ours), f"{where} mm_vision_config.{theirs}")
  for ours, theirs in (("num_queries", "mm_num_queries"), ("heads", "mm_query_heads")):
    if theirs in hf:
      facts.add(f"query.{ours}", int(hf[theirs]), f"{where} {theirs}")


def _query_facts(facts: _Facts, source: TensorSource):
  key = _LLAVA_QUERY + "query"
  if key in source:
    m, width = source.shape(key)
    facts.add("query.num_queries", m, f"{key} {source.shape(key)}")
    facts.add("query.width", width, f"{key} {source.shape(key)}")
  proj = _LLAVA_QUERY + "proj"
  if proj in source:
    facts.add("query.out_dim", source.shape(proj)[1], f"{proj} {source.shape(proj)}")


def checkpoint_facts(config) -> dict:
  """What the HF checkpoints named by `config.init` record about the architecture:
  {"llm.depth": (value, where it says so)}. Reads config.json files and safetensors
  headers only."""
  init, facts = config.init, _Facts()
  if init.mqt_llava:
    source, hf = TensorSource(init.mqt_llava), read_hf_config(init.mqt_llava)
    name = init.mqt_llava
    _llm_facts(facts, source, hf, name)
    _llava_facts(facts, hf, name)
    _query_facts(facts, source)
    if _clip_prefix(source, (_LLAVA_CLIP,)):
      if init.clip:
        raise CheckpointError(f"config.init.clip={init.clip} would not be used: the checkpoint "
                              f"{init.mqt_llava} holds the vision tower ({_LLAVA_CLIP}*); "
                              f"leave init.clip empty")
      _vision_facts(facts, source, _LLAVA_CLIP, None, name)
  if init.clip:
    source = TensorSource(init.clip)
    _vision_facts(facts, source, _clip_prefix(source, ("vision_model.", "")) or "",
                  read_hf_config(init.clip), init.clip)
  if init.llm and not init.mqt_llava:
    _llm_facts(facts, TensorSource(init.llm), read_hf_config(init.llm), init.llm)
  return facts.items


def model_config_for_checkpoint(config, user_set=None, log=print) -> ModelConfig:
  """config.model with the architecture the HF checkpoints of `config.init` record.

  Every command uses it when `config.init.kind == "hf"` (train, predict, evaluate,
  export). What the checkpoint records (config.json's LLaMA, LLaVA and CLIP fields; the
  tensor shapes: layer counts, widths, M from `model.query_abstractor.query`) replaces
  the config's defaults, with one printed line naming the fields that changed (`log`).
  What it does not record (the query transformer's heads; CLIP's heads and eps when only
  the combined checkpoint is given, unless export.py's `mm_vision_config` /
  `mm_query_heads` are there) stays the config's, checked where it can be (heads divide
  the width). A field the user set (`user_set`, dotted names under config,
  e.g. "model.llm.depth"; None: the command line's --config.* overrides) that the
  checkpoint contradicts is an error naming the field and both values.
  """
  from mqt import cli  # pylint: disable=import-outside-toplevel
  user_set = cli.user_settings() if user_set is None else set(user_set)
  model = config.model.copy_and_resolve_references()
  changed = []
  for field, (value, where) in checkpoint_facts(config).items():
    part, name = field.split(".")
    sub = model[part]
    current = sub.get(name)
    if current == value:
      continue
    if f"model.{field}" in user_set:
      raise CheckpointError(f"--config.model.{field}={current} contradicts the checkpoint: "
                            f"{where} says {value}")
    with sub.unlocked():
      sub[name] = value
    if current is not None:  # query.width / out_dim default to the towers' widths.
      changed.append(f"{field} {current} -> {value}")
  cfg = ModelConfig.from_config(model)
  _check_unrecorded(cfg)
  if changed and log:
    source = config.init.mqt_llava or f"{config.init.clip} + {config.init.llm}"
    log(f"from the checkpoint {source}: {', '.join(changed)}")
  return cfg


def _check_unrecorded(cfg: ModelConfig):
  """The fields a checkpoint cannot state, checked against the shapes it does."""
  for field, heads, width in (("query.heads", cfg.query.heads, cfg.query.width),
                              ("vision.heads", cfg.vision.heads, cfg.vision.width)):
    if heads <= 0 or width % heads:
      raise CheckpointError(f"config.model.{field}={heads} does not divide the width {width} "
                            f"(the checkpoint does not record it; set it so it does)")
  if cfg.query.width != cfg.vision.width:
    raise CheckpointError(f"the query transformer's width {cfg.query.width} is not the vision "
                          f"tower's {cfg.vision.width}")
  if cfg.query.out_dim != cfg.llm.width:
    raise CheckpointError(f"the query transformer's output width {cfg.query.out_dim} is not "
                          f"the LLM's {cfg.llm.width}")
  try:
    cfg.vision.layers_used  # pylint: disable=pointless-statement
  except ValueError as e:
    raise CheckpointError(f"config.model.vision.{e}") from None
