"""The conversion rule tables: our parameter paths <-> HF checkpoint keys.

Conversion is data: each component has a table of rules (our path, HF key, hook),
`{i}` standing for a layer index; hooks transpose torch Linear weights ([out, in] ->
[in, out]), reorder the patch conv ([O, I, H, W] -> [H, W, I, O]) and split the packed
`in_proj` of `nn.MultiheadAttention`. Scanned decoder stacks are stacked along axis 0.
Import (mqt/convert.py) reads the tables forwards, export (mqt/export.py) backwards
(`INVERSE`); `checkpoint_layout` gives the released layout from them.
"""
import dataclasses
import re
from typing import Callable

import numpy as np
from flax import traverse_util

from mqt.checkpoint_io import CheckpointError
from mqt.model import ModelConfig, abstract_params, unbox_abstract

Hook = Callable[[np.ndarray], np.ndarray]

TRANSPOSE: Hook = lambda w: w.T
IDENTITY: Hook = lambda w: w
CONV: Hook = lambda w: w.transpose(2, 3, 1, 0)  # [O, I, H, W] -> [H, W, I, O].
# Each whole-tensor hook's inverse (the packed `rows` parts are joined by export).
INVERSE = {TRANSPOSE: lambda w: w.T, IDENTITY: lambda w: w,
           CONV: lambda w: w.transpose(3, 2, 0, 1)}

# Key prefixes of the released MQT-LLaVA checkpoint.
LLAVA_CLIP = "model.vision_tower.vision_tower.vision_model."
LLAVA_QUERY = "model.query_abstractor."


def rows(part: int) -> Hook:
  """The hook taking third `part` of a packed [3d, in] / [3d] tensor (as [in, d] / [d])."""
  def hook(w):
    d = w.shape[0] // 3
    piece = w[part * d:(part + 1) * d]
    return piece.T if w.ndim == 2 else piece
  hook.packed_part = part  # Which third of a packed [3d, ...] tensor (see `hf_shape`).
  return hook


def hf_shape(hook: Hook, shape) -> tuple:
  """The checkpoint shape that `hook` turns into our `shape` (its inverse, on shapes)."""
  shape = tuple(shape)
  if hook is TRANSPOSE:
    return shape[::-1]
  if hook is CONV:
    h, w, i, o = shape
    return (o, i, h, w)
  if hasattr(hook, "packed_part"):  # ours [in, d] or [d] <- theirs [3d, in] or [3d].
    return (3 * shape[-1], *shape[:-1])
  return shape


def _linear(ours: str, theirs: str, bias: bool = True):
  rules = [(f"{ours}/kernel", f"{theirs}.weight", TRANSPOSE)]
  if bias:
    rules.append((f"{ours}/bias", f"{theirs}.bias", IDENTITY))
  return rules


def _norm(ours: str, theirs: str, bias: bool = True):
  rules = [(f"{ours}/scale", f"{theirs}.weight", IDENTITY)]
  if bias:
    rules.append((f"{ours}/bias", f"{theirs}.bias", IDENTITY))
  return rules


def clip_rules():
  layer = "encoder.layers.{i}."
  return [
      ("patch_embedding/kernel", "embeddings.patch_embedding.weight", CONV),
      ("class_embedding", "embeddings.class_embedding", IDENTITY),
      ("position_embedding", "embeddings.position_embedding.weight", IDENTITY),
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
      ("embed_tokens/embedding", "model.embed_tokens.weight", IDENTITY),
      *[r for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        for r in _linear(f"layers_{{i}}/{n}", f"{layer}self_attn.{n}", bias=False)],
      *[r for n in ("gate_proj", "up_proj", "down_proj")
        for r in _linear(f"layers_{{i}}/{n}", f"{layer}mlp.{n}", bias=False)],
      *_norm("layers_{i}/input_layernorm", f"{layer}input_layernorm", bias=False),
      *_norm("layers_{i}/post_attention_layernorm", f"{layer}post_attention_layernorm",
             bias=False),
      *_norm("norm", "model.norm", bias=False),
      ("lm_head/kernel", "lm_head.weight", TRANSPOSE),
  ]


def official_query_rules():
  return [
      ("latents/query", "query", IDENTITY),
      ("latents/pos_embed", "pos_embed", IDENTITY),
      *[(f"{n}/{leaf}", f"attn.in_proj_{hf}", rows(part))
        for part, n in enumerate(("q_proj", "k_proj", "v_proj"))
        for leaf, hf in (("kernel", "weight"), ("bias", "bias"))],
      *_linear("out_proj", "attn.out_proj"),
      *_norm("ln_q", "ln_q"), *_norm("ln_k", "ln_k"), *_norm("ln_v", "ln_v"),
      ("proj", "proj", IDENTITY),
  ]


# Buffers some checkpoints carry that are not parameters.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


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


def expected_params(cfg: ModelConfig) -> dict:
  """The whole abstract parameter tree {"vision", "query", "llm"} (ShapeDtypeStructs)."""
  return unbox_abstract(abstract_params(cfg))["params"]


def clip_prefix(source, candidates) -> str | None:
  """The first of `candidates` under which `source` holds a CLIP patch embedding."""
  for p in candidates:
    if any(k.startswith(p + "embeddings.patch_embedding") for k in source.keys()):
      return p
  return None


def checkpoint_layout(cfg: ModelConfig, with_vision: bool = True) -> dict:
  """The released MQT-LLaVA checkpoint's tensors: {key: shape}, in the released order
  (embeddings, decoder layers, final norm, vision tower, query transformer, lm_head),
  from the rule tables and abstract shapes; nothing is allocated. A packed tensor
  (the resampler's `in_proj`) appears once."""
  expected = expected_params(cfg)
  llm = plan_component(llama_rules(), expected["llm"], "", cfg.llm.scan_layers)
  parts = [p for leaf in llm.values() for p in _with_shapes(leaf)]
  head = [x for x in parts if x[0].key == "lm_head.weight"]
  parts = [x for x in parts if x[0].key != "lm_head.weight"]
  if with_vision:
    parts += [p for leaf in plan_component(clip_rules(), expected["vision"],
                                           LLAVA_CLIP).values() for p in _with_shapes(leaf)]
  parts += [p for leaf in plan_component(official_query_rules(), expected["query"],
                                         LLAVA_QUERY).values() for p in _with_shapes(leaf)]
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
