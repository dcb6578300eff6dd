"""The architecture an HF checkpoint records, and the config.json a released one carries.

`model_config_for_checkpoint` reads config.json (LLaMA, LLaVA and CLIP fields) and the
tensor shapes (layer counts, widths, the query count) over config.model's defaults;
`released_config` and `clip_config` write those fields back (what an export's
config.json holds). Only config.json files and safetensors headers are read.
"""
import json
import math
import os
import re

from mqt import cli
from mqt import paths
from mqt.checkpoint_io import CheckpointError, TensorSource
from mqt.convert_rules import LLAVA_CLIP, LLAVA_QUERY, clip_prefix
from mqt.decoder import LlamaConfig
from mqt.model import ModelConfig
from mqt.vision import VisionConfig


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


def clip_config(v: VisionConfig) -> dict:
  """VisionConfig -> an HF CLIPVisionConfig dict (`vision_config_from_hf`'s input)."""
  return {"model_type": "clip_vision_model", "image_size": v.image_size,
          "patch_size": v.patch_size, "hidden_size": v.width, "num_hidden_layers": v.depth,
          "num_attention_heads": v.heads, "intermediate_size": v.mlp_dim,
          "layer_norm_eps": v.ln_eps, "num_channels": v.channels, "hidden_act": "quick_gelu"}


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
  key = LLAVA_QUERY + "query"
  if key in source:
    m, width = source.shape(key)
    facts.add("query.num_queries", m, f"{key} {source.shape(key)}")
    facts.add("query.width", width, f"{key} {source.shape(key)}")
  proj = LLAVA_QUERY + "proj"
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
    if clip_prefix(source, (LLAVA_CLIP,)):
      if init.clip:
        raise CheckpointError(f"config.init.clip={init.clip} would not be used: the checkpoint "
                              f"{init.mqt_llava} holds the vision tower ({LLAVA_CLIP}*); "
                              f"leave init.clip empty")
      _vision_facts(facts, source, LLAVA_CLIP, None, name)
  if init.clip:
    source = TensorSource(init.clip)
    _vision_facts(facts, source, clip_prefix(source, ("vision_model.", "")) or "",
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
