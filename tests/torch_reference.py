"""PyTorch statements of the reference systems, written for the tests.

* `RefQueryTransformer`: SPEC section 2's official resampler, stated with
  `nn.MultiheadAttention` and `F.interpolate(mode="bicubic")`, parameter names
  as in the released checkpoint.
* `RefMQTLLaVA`: HF CLIP + that module + HF LLaMA joined by LLaVA's splice
  (visual embeddings replace the placeholder, contiguous positions, right
  padding, HF's shifted cross-entropy).
* Tiny random HF models and a helper that saves state dicts as safetensors,
  single-file or sharded with an index json.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

IMAGE = -200


def randomize_(module: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
  """Replaces every parameter with noise large enough that mapping errors show."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if p.ndim == 1 and ("norm" in name or name.startswith("ln_") or "layrnorm" in name) \
          and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        fan_in = p.shape[-1] if p.ndim >= 2 else 16
        p.copy_(noise * min(scale, 2.0 / math.sqrt(fan_in)))
  return module


def tiny_clip(seed=0, layers=3, image_size=30, patch=6, width=48, heads=4):
  cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, image_size=image_size, patch_size=patch,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5)
  torch.manual_seed(seed)
  model = CLIPVisionModel(cfg).eval()
  return randomize_(model, seed), cfg


def tiny_llama(seed=0, vocab=97, width=64, layers=2, heads=4, kv_heads=2, mlp=96):
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
                    num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                    max_position_embeddings=256, tie_word_embeddings=False,
                    attn_implementation="eager")
  torch.manual_seed(seed)
  model = LlamaForCausalLM(cfg).eval()
  return randomize_(model, seed), cfg


class RefQueryTransformer(nn.Module):
  """The official resampler: one cross-attention, position-only keys."""

  def __init__(self, width, heads, out_dim, num_queries):
    super().__init__()
    self.grid = math.isqrt(num_queries)
    self.query = nn.Parameter(torch.zeros(num_queries, width))
    self.pos_embed = nn.Parameter(torch.zeros(num_queries, width))
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_q = nn.LayerNorm(width, eps=1e-6)
    self.ln_k = nn.LayerNorm(width, eps=1e-6)
    self.ln_v = nn.LayerNorm(width, eps=1e-6)
    self.proj = nn.Parameter(torch.zeros(width, out_dim))

  def key_table(self, side):
    c = self.pos_embed.shape[1]
    table = self.pos_embed.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(side, side), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(side * side, c)

  def forward(self, feats, m):
    """feats [B, P, C] -> [B, m, out_dim]."""
    b, p, _ = feats.shape
    keys = self.key_table(math.isqrt(p))
    q = self.ln_q(self.query[:m] + self.pos_embed[:m])[:, None].expand(m, b, -1)
    k = self.ln_k(keys)[:, None].expand(p, b, -1)
    v = self.ln_v(feats.transpose(0, 1))
    out = self.attn(q, k, v, need_weights=False)[0]
    return out.transpose(0, 1) @ self.proj


class RefMQTLLaVA(nn.Module):
  def __init__(self, clip, query, llm, select_layer=-2):
    super().__init__()
    self.clip, self.query, self.llm, self.select_layer = clip, query, llm, select_layer

  def forward(self, pixels, ids, labels, m):
    """pixels [B, C, H, W]; ids, labels: lists of 1-D LongTensors (one IMAGE id each).

    Returns (logits [B, L, V], loss, offsets) where offsets[b] maps text index
    -> row of logits (None for the placeholder).
    """
    hidden = self.clip(pixels, output_hidden_states=True).hidden_states[self.select_layer]
    vis = self.query(hidden[:, 1:], m)
    embed = self.llm.get_input_embeddings()
    seqs, labs, offsets = [], [], []
    for b, (x, y) in enumerate(zip(ids, labels)):
      p = int((x == IMAGE).nonzero()[0, 0])
      seqs.append(torch.cat([embed(x[:p]), vis[b], embed(x[p + 1:])]))
      labs.append(torch.cat([y[:p], torch.full((m,), -100), y[p + 1:]]))
      offsets.append([t if t < p else (None if t == p else t - 1 + m) for t in range(len(x))])
    n = max(len(s) for s in seqs)
    d = seqs[0].shape[1]
    inputs = torch.zeros(len(seqs), n, d)
    lab = torch.full((len(seqs), n), -100)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for b, (s, y) in enumerate(zip(seqs, labs)):
      inputs[b, :len(s)], lab[b, :len(s)], mask[b, :len(s)] = s, y, 1
    pos = torch.arange(n)[None].expand(len(seqs), n)
    out = self.llm(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, labels=lab)
    return out.logits, out.loss, offsets


def released_state(clip, query, llm) -> dict:
  """The three torch modules' tensors under the released MQT-LLaVA checkpoint's names."""
  state = {f"model.vision_tower.vision_tower.vision_model.{k}": v
           for k, v in clip.state_dict().items()}
  state.update({f"model.query_abstractor.{k}": v for k, v in query.state_dict().items()})
  state.update(llm.state_dict())
  return state


def save_safetensors(state: dict, path: str, shards: int = 1) -> str:
  """Saves {name: tensor} as one file or `shards` files plus an index json."""
  state = {k: v.detach().contiguous() for k, v in state.items()}
  os.makedirs(path, exist_ok=True)
  if shards == 1:
    save_file(state, os.path.join(path, "model.safetensors"))
    return path
  keys = sorted(state)
  weight_map = {}
  for i in range(shards):
    name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: state[k] for k in keys[i::shards]}
    save_file(part, os.path.join(path, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return path


def to_np(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().numpy()
