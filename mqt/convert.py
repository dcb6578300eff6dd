"""Import HF weights (CLIP vision, LLaMA, MQT-LLaVA) into our parameter tree.

Conversion is data: each component has a table of rules
(our path, HF key, hook), `{i}` standing for a layer index; hooks transpose
torch Linear weights ([out, in] -> [in, out]), reorder the patch conv
([O, I, H, W] -> [H, W, I, O]) and split the packed `in_proj` of
`nn.MultiheadAttention`. Scanned decoder stacks are stacked along axis 0.

Every expected parameter must come from a key of the right shape, and every
key of the checkpoint must be used (or be a known buffer): anything else is a
`CheckpointError` naming the key and the file.
"""
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

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
  return hook


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


class _Reader:
  """Applies rules for one component, tracking which checkpoint keys were used."""

  def __init__(self, source: TensorSource):
    self.source = source
    self.used = set()

  def component(self, rules, expected: dict, prefix: str, scanned: bool = False, dtype=None):
    """expected: abstract tree of the component -> nested dict of numpy arrays."""
    flat_expected = traverse_util.flatten_dict(expected, sep="/")
    out = {}
    for ours, theirs, hook in rules:
      if "{i}" not in ours:
        if ours in flat_expected:
          out[ours] = self._take(prefix + theirs, hook, ours, flat_expected[ours].shape, dtype)
        continue
      if scanned:
        path = ours.replace("layers_{i}", "layers")
        if path not in flat_expected:
          continue
        depth = flat_expected[path].shape[0]
        out[path] = np.stack([
            self._take(prefix + theirs.format(i=i), hook, f"{path}[{i}]",
                       flat_expected[path].shape[1:], dtype) for i in range(depth)])
      else:
        i = 0
        while ours.format(i=i) in flat_expected:
          out[ours.format(i=i)] = self._take(prefix + theirs.format(i=i), hook, ours.format(i=i),
                                             flat_expected[ours.format(i=i)].shape, dtype)
          i += 1
    missing = sorted(set(flat_expected) - set(out))
    if missing:
      raise CheckpointError(f"no conversion rule for parameter(s) {missing}")
    return traverse_util.unflatten_dict(out, sep="/")

  def _take(self, key, hook, ours, shape, dtype):
    if key not in self.source:
      raise CheckpointError(f"missing key {key} (for parameter {ours}) in {self.source.name}")
    w = hook(self.source.get(key))
    if tuple(w.shape) != tuple(shape):
      raise CheckpointError(
          f"key {key} in {self.source.name} has shape {tuple(self.source.shape(key))}, "
          f"which does not fit parameter {ours} of shape {tuple(shape)}")
    self.used.add(key)
    return np.asarray(w, dtype=dtype or np.float32)

  def check_all_used(self, prefixes=("",)):
    extra = sorted(k for k in self.source.keys()
                   if k not in self.used and not _IGNORED.search(k)
                   and any(k.startswith(p) for p in prefixes))
    if extra:
      shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
      raise CheckpointError(f"unexpected key(s) in {self.source.name}: {shown}")


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


def import_clip_vision(path, cfg: VisionConfig, source: TensorSource | None = None):
  """HF CLIPVisionModel (keys with or without `vision_model.`) -> params["vision"]."""
  source = source or TensorSource(path)
  prefix = _clip_prefix(source, ("vision_model.", ""))
  if prefix is None:
    raise CheckpointError(f"{source.name} holds no CLIP vision tower "
                          f"(no embeddings.patch_embedding.weight)")
  reader = _Reader(source)
  tree = reader.component(clip_rules(), expected_vision(cfg), prefix, dtype=cfg.param_dtype)
  reader.check_all_used((prefix,) if prefix else ("",))
  return tree


def expected_query(c: QueryConfig, num_patches: int):
  return _abstract(make_query_transformer(c), jnp.zeros((1, num_patches, c.width)), 1)


def import_official_query(path, cfg: QueryConfig, num_patches: int):
  """The official resampler's weights (bare or under `model.query_abstractor.`)."""
  source = TensorSource(path)
  prefix = _LLAVA_QUERY if any(k.startswith(_LLAVA_QUERY) for k in source.keys()) else ""
  reader = _Reader(source)
  tree = reader.component(official_query_rules(), expected_query(cfg, num_patches), prefix,
                          dtype=cfg.param_dtype)
  reader.check_all_used((prefix,))
  return tree


def import_llama(path, cfg: LlamaConfig):
  """HF LlamaForCausalLM -> params["llm"]."""
  reader = _Reader(TensorSource(path))
  tree = reader.component(llama_rules(), expected_llm(cfg), "", cfg.scan_layers,
                          dtype=cfg.param_dtype)
  reader.check_all_used()
  return tree


_LLAVA_CLIP = "model.vision_tower.vision_tower.vision_model."
_LLAVA_QUERY = "model.query_abstractor."


def import_mqt_llava(path, cfg: ModelConfig, clip_path=None):
  """HF-format MQT-LLaVA checkpoint -> full params {"vision", "query", "llm"}.

  The vision tower is read from the checkpoint when it holds one, else from
  `clip_path` (LLaVA releases often leave CLIP out).
  """
  if cfg.query.variant != "official":
    raise CheckpointError(f"{path}: MQT-LLaVA checkpoints hold the official query "
                          f"transformer; the config asks for variant {cfg.query.variant!r}")
  source = TensorSource(path)
  expected = _expected(cfg)
  reader = _Reader(source)
  params = {
      "query": reader.component(official_query_rules(), expected["query"], _LLAVA_QUERY,
                                dtype=cfg.query.param_dtype),
      "llm": reader.component(llama_rules(), expected["llm"], "", cfg.llm.scan_layers,
                              dtype=cfg.llm.param_dtype),
  }
  if _clip_prefix(source, (_LLAVA_CLIP,)):
    params["vision"] = reader.component(clip_rules(), expected["vision"], _LLAVA_CLIP,
                                        dtype=cfg.vision.param_dtype)
  elif clip_path is not None:
    params["vision"] = import_clip_vision(clip_path, cfg.vision)
  else:
    raise CheckpointError(f"{source.name} holds no vision tower "
                          f"({_LLAVA_CLIP}*); pass the CLIP checkpoint as clip_path")
  reader.check_all_used()
  return params




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
