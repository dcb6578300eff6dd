"""MQT-LLaVA: image -> CLIP tower -> Matryoshka query transformer -> LLaMA.

The prompt holds one `<image>` placeholder id (`image_token_id`, LLaVA's
-200). Its place is taken by the first m of the M visual tokens. The spliced
sequence has a static length S = T + M - 1 for every m: text before the
placeholder, the m valid visual tokens, the text after it, then padding; the
M - m unused visual slots join the right padding, masked out of attention.
Positions come from that mask (contiguous over valid slots), so the text after
the image sits exactly where it would if only m tokens had been inserted,
which is LLaVA's splice with right padding.

Parameter tree: {"vision": ..., "query": ..., "llm": ...}.
Shapes: images [B, H, W, C]; input_ids, text_mask, labels [B, T]; m an int,
a traced int32 scalar, or [B]; logits [B, S, V].
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from mqt import layers
from mqt.decoder import LlamaConfig, LlamaDecoder
from mqt.sharding import unbox_abstract  # pylint: disable=unused-import  (re-exported)
from mqt.query_transformer import QueryConfig, make_query_transformer
from mqt.vision import VisionConfig, VisionTower

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig
  query: QueryConfig
  llm: LlamaConfig
  image_token_id: int = -200
  train_vision: bool = False  # False: no gradient ever flows into the tower.

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "ModelConfig":
    """Builds the model config from `config.model`; unknown keys are errors."""
    def build(kind, sub, where, **extra):
      fields = {f.name for f in dataclasses.fields(kind)}
      d = dict(sub)
      unknown = sorted(set(d) - fields)
      if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config.model.{where}; "
                         f"known: {sorted(fields)}")
      return kind(**{**d, **extra})
    top = dict(cfg)
    dt = dict(dtype=top.pop("dtype", "float32"), param_dtype=top.pop("param_dtype", "float32"))
    v = build(VisionConfig, top.pop("vision"), "vision", **dt)
    llm = build(LlamaConfig, top.pop("llm"), "llm", **dt)
    q = dict(top.pop("query"))
    q.setdefault("width", v.width)
    q.setdefault("out_dim", llm.width)
    qc = build(QueryConfig, q, "query", **dt)
    return build(cls, top, "", vision=v, query=qc, llm=llm)


@dataclasses.dataclass
class Layout:
  """Where each slot of the spliced sequence comes from. All [B, S] int32/bool."""
  valid: jax.Array  # True for real (attended) slots: a contiguous prefix.
  text_index: jax.Array  # Source text position, or -1.
  visual_index: jax.Array  # Source visual token, or -1.

  def gather_labels(self, labels: jax.Array) -> jax.Array:
    """labels [B, T] in text space -> [B, S] in spliced space (IGNORE elsewhere)."""
    got = jnp.take_along_axis(labels, jnp.maximum(self.text_index, 0), axis=1)
    return jnp.where(self.text_index >= 0, got, IGNORE)


jax.tree_util.register_dataclass(Layout, data_fields=["valid", "text_index", "visual_index"],
                                 meta_fields=[])


def splice_layout(input_ids, text_mask, m, num_slots: int, image_token_id: int) -> Layout:
  """Computes the packed layout of text + visual slots (see module docstring)."""
  b, t = input_ids.shape
  s = t + num_slots - 1
  text_mask = text_mask.astype(bool)
  length = text_mask.sum(axis=1)  # Valid text tokens, placeholder included.
  is_img = (input_ids == image_token_id) & text_mask
  has_img = is_img.any(axis=1)
  p = jnp.where(has_img, jnp.argmax(is_img, axis=1), length)
  m = jnp.broadcast_to(jnp.asarray(m, jnp.int32), (b,))
  m_eff = jnp.where(has_img, jnp.clip(m, 0, num_slots), 0)
  skip = has_img.astype(jnp.int32)
  idx = jnp.arange(s)[None, :]
  p, m_eff, skip, length = p[:, None], m_eff[:, None], skip[:, None], length[:, None]
  pre = idx < p
  vis = (idx >= p) & (idx < p + m_eff)
  post_src = idx - m_eff + skip
  post = ~pre & ~vis & (post_src < length)
  text_index = jnp.where(pre, idx, jnp.where(post, post_src, -1)).astype(jnp.int32)
  visual_index = jnp.where(vis, idx - p, -1).astype(jnp.int32)
  return Layout(valid=pre | vis | post, text_index=text_index, visual_index=visual_index)


def text_slots(input_ids, text_mask, m, image_token_id: int) -> jax.Array:
  """[B, T]: the spliced slot of each text token (-1 for placeholder/padding)."""
  b, t = input_ids.shape
  text_mask = text_mask.astype(bool)
  is_img = (input_ids == image_token_id) & text_mask
  has_img = is_img.any(axis=1, keepdims=True)
  p = jnp.argmax(is_img, axis=1)[:, None]
  m = jnp.broadcast_to(jnp.asarray(m, jnp.int32), (b,))[:, None]
  tt = jnp.arange(t)[None]
  out = jnp.where(has_img & (tt > p), tt - 1 + m, tt)
  return jnp.where(text_mask & ~is_img, out, -1)


class MQTLLaVA(nn.Module):
  cfg: ModelConfig

  def setup(self):
    self.vision = VisionTower(self.cfg.vision, name="vision")
    self.query = make_query_transformer(self.cfg.query, name="query")
    self.llm = LlamaDecoder(self.cfg.llm, name="llm")

  def embed_image(self, images, m, num_latents: int | None = None):
    """images [B, H, W, C] -> (tokens [B, n, D], mask [B, n])."""
    feats = self.vision(images)
    if not self.cfg.train_vision:
      feats = jax.lax.stop_gradient(feats)
    tokens, mask = self.query(layers.constrain(feats), m, num_latents)
    return layers.constrain(tokens), mask

  def embed_image_and_text(self, images, input_ids, text_mask, m,
                           num_latents: int | None = None):
    """-> (embeds [B, S, D], positions [B, S], layout)."""
    tokens, _ = self.embed_image(images, m, num_latents)
    layout = splice_layout(input_ids, text_mask, m, tokens.shape[1], self.cfg.image_token_id)
    text = self.llm.embed(jnp.where(input_ids < 0, 0, input_ids))
    take = lambda src, i: jnp.take_along_axis(src, jnp.maximum(i, 0)[..., None], axis=1)
    emb = jnp.where((layout.visual_index >= 0)[..., None],
                    take(tokens.astype(text.dtype), layout.visual_index),
                    take(text, layout.text_index))
    emb = layers.constrain(jnp.where(layout.valid[..., None], emb, 0))
    positions = jnp.broadcast_to(jnp.arange(emb.shape[1]), layout.valid.shape)
    return emb, positions, layout

  def __call__(self, images, input_ids, text_mask, m, num_latents: int | None = None,
               return_hidden: bool = False):
    """-> (logits [B, S, V] float32, layout); return_hidden: the LLM's hidden states
    [B, S, D] before its final norm instead of logits (`head` maps them to logits)."""
    emb, positions, layout = self.embed_image_and_text(images, input_ids, text_mask, m,
                                                        num_latents)
    out, _ = self.llm(emb, positions, attention_mask(layout.valid), return_hidden=return_hidden)
    return out, layout

  def head(self, hidden: jax.Array) -> jax.Array:
    """LLM hidden states [B, T, D] (before the final norm) -> logits [B, T, V] float32."""
    return self.llm.head(hidden)


def attention_mask(valid: jax.Array) -> jax.Array:
  """valid [B, S] -> causal mask [B, S, S]; padded rows attend to themselves only."""
  s = valid.shape[1]
  causal = jnp.tril(jnp.ones((s, s), bool))[None]
  return causal & (valid[:, None, :] | jnp.eye(s, dtype=bool)[None])


def next_token_loss(logits: jax.Array, layout: Layout, labels: jax.Array):
  """Mean next-token cross-entropy over labelled text positions.

  Returns (loss, {"loss_sum", "tokens"}) so callers can accumulate exactly.
  """
  target = layout.gather_labels(labels)[:, 1:]
  logits = logits[:, :-1].astype(jnp.float32)
  keep = target != IGNORE
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(keep, nll, 0.0))
  count = keep.sum()
  return total / jnp.maximum(count, 1), {"loss_sum": total, "tokens": count}


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy of float32 logits [..., V] at integer targets [...]; 0 where the
  target is IGNORE. The backward is (softmax - one_hot) * g in one elementwise pass
  (the autodiff of log_softmax + take_along_axis scatters into a [..., V] zero
  buffer, the largest cost of the CPU train step before)."""
  return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
  lse = jax.nn.logsumexp(logits, axis=-1)
  keep = targets != IGNORE
  picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(keep, lse - picked, 0.0), (logits, lse, targets)


def _token_nll_bwd(res, g):
  logits, lse, targets = res
  g = jnp.where(targets != IGNORE, g, 0.0)[..., None]
  hot = jnp.arange(logits.shape[-1]) == targets[..., None]
  dlogits = (jnp.exp(logits - lse[..., None]) - hot.astype(logits.dtype)) * g
  return dlogits, np.zeros(targets.shape, jax.dtypes.float0)


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def chunked_next_token_loss(head, hidden: jax.Array, layout: Layout, labels: jax.Array,
                             chunk: int):
  """`next_token_loss` from hidden states, never holding [B, S, V] logits.

  head: x [B, c, D] -> logits [B, c, V] float32 (the LM head, e.g. `MQTLLaVA.head`);
  hidden [B, S, D]. The head and log-softmax run over `chunk` positions at a time
  under `jax.checkpoint` (backward recomputes each chunk's logits), so at most
  [B, chunk, V] float32 logits live at once. The same per-position values as
  `next_token_loss`; only the order of the final sum differs.
  """
  target = layout.gather_labels(labels)[:, 1:]
  x = hidden[:, :-1]
  b, n, d = x.shape
  c = max(1, min(chunk, n))
  pad = -n % c
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
  padded = jnp.pad(target, ((0, 0), (0, pad)), constant_values=IGNORE)
  xs = x.reshape(b, -1, c, d).swapaxes(0, 1)  # [n / c, B, c, D]
  ts = padded.reshape(b, -1, c).swapaxes(0, 1)  # [n / c, B, c]

  def chunk_sum(x_c, t_c):  # The head on flat rows [B*c, D] (see decoder.LlamaBlock).
    logits = layers.constrain(head(layers.constrain(x_c).reshape(-1, d)), ("batch", "vocab"))
    return jnp.sum(token_nll(logits, t_c.reshape(-1)))

  if xs.shape[0] == 1:  # One chunk: nothing to save by recomputing the logits.
    total = chunk_sum(xs[0], ts[0])
  else:
    total = jnp.sum(jax.lax.map(lambda xt: jax.checkpoint(chunk_sum)(*xt), (xs, ts)))
  count = (target != IGNORE).sum()
  return total / jnp.maximum(count, 1), {"loss_sum": total, "tokens": count}


def dummy_inputs(cfg: ModelConfig, batch: int = 1, text_len: int = 8):
  v = cfg.vision
  images = jnp.zeros((batch, v.image_size, v.image_size, v.channels), jnp.float32)
  ids = jnp.zeros((batch, text_len), jnp.int32).at[:, 1].set(cfg.image_token_id)
  return images, ids, jnp.ones((batch, text_len), bool)


def abstract_params(cfg: ModelConfig) -> Any:
  """Boxed abstract variables (shapes, dtypes, logical names); nothing allocated."""
  model = MQTLLaVA(cfg)
  images, ids, mask = dummy_inputs(cfg)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids, mask,
                                           cfg.query.num_queries))


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameters per top-level component and in total, from abstract shapes."""
  params = unbox_abstract(abstract_params(cfg))["params"]
  counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}
  counts["total"] = sum(counts.values())
  return counts
