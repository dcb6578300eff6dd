r"""Stage 2 with perfect vision: how fast the tiny LLM alone learns each question type.

  python -m bench.oracle_slots                       # the earlier default's stage 2
  python -m bench.oracle_slots --steps=3000 --eval_every=500
  python -m bench.oracle_slots --template=qa --split_rounds --steps=1000   # today's

The image is replaced by 9 "oracle" slot embeddings, one per grid cell in
reading order, each the sum of learned embeddings of the cell and of the
shape, colour and size of the object there (or "empty"). The LLM (configs/tiny.py's
shape, from scratch) then trains on the built-in instruct conversations as a
stage 2 does (loss on the answers, AdamW with the stage-2 optimizer settings):
by default as the earlier default did (vicuna_v1, whole conversations, image
first), with `--template=qa --split_rounds` as configs/tiny.py's stage 2 does now
(one question per sample, the image after it). It is scored on the held-out
questions (teacher-forced, whole answer right), per question type and subtype.
Whatever this LLM cannot learn here, it cannot learn from the query
transformer's latents either: it separates what the language model can learn in
a budget from what the vision side gives it. No images are rendered; the
tokenizer is the built-in one (trained on first use into --workdir). The
held-out questions are single-round, so --split_rounds changes only training.

  python -m bench.oracle_slots --latents_from=/tmp/mqt_tiny/stage1/checkpoints

puts a trained model's M latents (m = M, frozen, through a trainable linear map
that starts as the identity) where the oracle slots were: the same LLM, data and
steps, so the two runs side by side say what the latents cost.
"""
import collections
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from absl import app
from absl import flags

from configs import tiny
from data import images as images_lib
from data import prepare
from data import synthetic
from data import templates
from data import tokenizer as tokenizer_lib
from mqt import optim
from mqt import params as params_lib
from mqt import sharding
from mqt.decoder import LlamaDecoder
from mqt.model import IGNORE, ModelConfig, MQTLLaVA, attention_mask

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mqt_oracle", "Tokenizer and results go here.")
_STEPS = flags.DEFINE_integer("steps", 800, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Samples per step.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate (warmup, then cosine to 0).")
_DEPTH = flags.DEFINE_integer("depth", 0, "LLM layers (0: configs/tiny.py's).")
_N_TRAIN = flags.DEFINE_integer("n_train", 0, "Instruct conversations to draw from "
                                 "(0: as many as the built-in set has).")
_SYSTEM = flags.DEFINE_bool("system_prompt", True, "Keep vicuna_v1's system prompt.")
_TEMPLATE = flags.DEFINE_enum("template", "vicuna_v1", ["vicuna_v1", "qa"],
                              "Conversation template (qa: the default's stage 2, the image "
                              "after the question).")
_SPLIT = flags.DEFINE_bool("split_rounds", False, "One sample per question round (the "
                           "default's stage 2), not one per conversation.")
_TYPES = flags.DEFINE_list("types", [], "Train only on conversations that open with these "
                           "question types (with --split_rounds: questions of these types; "
                           "default: all).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 200, "Score the held-out split every N steps.")
_LATENTS = flags.DEFINE_string("latents_from", "", "A configs/tiny.py checkpoint directory: "
                               "its latents replace the oracle slots.")
_SEED = flags.DEFINE_integer("init_seed", 0, "Initialization and batch order.")

CELLS = synthetic.GRID * synthetic.GRID


def slot_features(scene) -> np.ndarray:
  """[9, 4] int32: per cell (reading order) its index and 1 + shape, colour, size (0: empty)."""
  f = np.zeros((CELLS, 4), np.int32)
  f[:, 0] = np.arange(CELLS)
  for o in scene.objects:
    f[o.row * synthetic.GRID + o.col, 1:] = (1 + synthetic.SHAPES.index(o.shape),
                                              1 + synthetic.COLORS.index(o.color),
                                              1 + synthetic.SIZES.index(o.size))
  return f


def _system_length(tok, ids) -> int:
  """How many tokens after BOS spell vicuna_v1's system prompt (the same in every sample:
  no piece crosses the space before "USER:")."""
  for k in range(1, len(ids)):
    if tok.decode(ids[1:1 + k]).strip() == templates.SYSTEM:
      return k
  raise ValueError(f"no system prompt at the start of {tok.decode(ids[:80])!r}")


def _samples(seed: int, split: str, n: int, split_rounds: bool):
  """-> (record index, scene, conversation, type, subtype, type to filter on) per sample
  of records 0..n-1: with `split_rounds` one sample per question round, its image
  moved into it (as data.sources.RoundsSource does); else one per record (type: the
  record's, "multi" for several questions; filtered on its first question's type)."""
  for i in range(n):
    rec, scene = synthetic.sample(seed, split, i)
    multi = rec["type"] == "multi"
    kinds = list(zip(rec["types"], rec["subtypes"])) if multi else [(rec["type"],
                                                                      rec.get("subtype"))]
    if not split_rounds:
      yield i, scene, rec["conversations"], rec["type"], rec.get("subtype"), kinds[0][0]
      continue
    for k, (t, sub) in enumerate(kinds):
      yield (i, scene, templates.one_round(rec["conversations"], k, scene is not None), t, sub,
             t)


def encode(tok, seed: int, split: str, n: int, types=(), system_prompt=True,
           latent_slots: int = 0, template: str = "vicuna_v1", split_rounds: bool = False):
  """-> (ids [N, L], labels [N, L], slots [N, L, 4] (-1: a text position), names [N]).

  The image placeholder becomes 9 slot positions (ids 0, no loss), each holding
  `slot_features`; with `latent_slots` = M instead M positions holding (latent
  index, sample index, 0, 0). `template` is one of data.templates' (the image where
  it puts it); `system_prompt` False drops vicuna_v1's system prompt; `split_rounds`
  makes one sample per question, as the default's stage 2 does."""
  n_slots = latent_slots or CELLS
  rows, cut = [], None
  for i, scene, conv, kind, subtype, first in _samples(seed, split, n, split_rounds):
    if types and first not in types:
      continue
    ids, labels = templates.encode_conversation(conv, tok, template, scene is not None,
                                                f"{split}_{i}")
    slots = np.full((len(ids) + n_slots, 4), -1, np.int32)
    if scene is not None:
      k = ids.index(templates.IMAGE_TOKEN_ID)
      ids = ids[:k] + [0] * n_slots + ids[k + 1:]
      labels = labels[:k] + [IGNORE] * n_slots + labels[k + 1:]
      if latent_slots:
        slots[k:k + n_slots, 0], slots[k:k + n_slots, 1:] = np.arange(n_slots), (i, 0, 0)
      else:
        slots[k:k + n_slots] = slot_features(scene)
    slots = slots[:len(ids)]
    if template == "vicuna_v1" and not system_prompt:  # Keep BOS, then from "USER:" on.
      cut = cut or _system_length(tok, ids)
      if tok.decode(ids[1:1 + cut]).strip() != templates.SYSTEM:
        raise ValueError(f"sample {split}_{i}: the system prompt is not its first {cut} tokens")
      ids, labels = ids[:1] + ids[1 + cut:], labels[:1] + labels[1 + cut:]
      slots = np.concatenate([slots[:1], slots[1 + cut:]])
    name = kind + (f"/{subtype}" if kind in ("choice", "colour", "short") else "")
    rows.append((ids, labels, slots, name))
  length = -(-max(len(r[0]) for r in rows) // 16) * 16
  ids = np.zeros((len(rows), length), np.int32)
  labels = np.full((len(rows), length), IGNORE, np.int32)
  slots = np.full((len(rows), length, 4), -1, np.int32)
  for r, (a, b, c, _) in enumerate(rows):
    ids[r, :len(a)], labels[r, :len(b)], slots[r, :len(c)] = a, b, c
  return ids, labels, slots, [r[3] for r in rows]


def model_latents(checkpoint: str, config, seed: int, wanted) -> list[np.ndarray]:
  """Per (split, n) in `wanted`, [n, M, D] float32: the M latents (as the LLM gets them)
  of samples 0..n-1 of the split, from a configs/tiny.py checkpoint; zeros for
  text-only samples."""
  cfg = ModelConfig.from_config(config.model)
  size, m = cfg.vision.image_size, cfg.query.num_queries
  mesh = sharding.make_mesh(config.sharding.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.logical_axis_rules)):
    params = params_lib.load_params(checkpoint, cfg, mesh, config)
    embed = jax.jit(lambda p, x: MQTLLaVA(cfg).apply({"params": p}, x, m,
                                                     method=MQTLLaVA.embed_image)[0])
    result = []
    for split, n in wanted:
      out = np.zeros((n, m, cfg.llm.width), np.float32)
      for start in range(0, n, 250):
        scenes = [synthetic.make_scene(seed, split, i, size)
                  for i in range(start, min(n, start + 250))]
        pixels = np.stack([np.zeros((size, size, 3), np.float32) if sc is None else
                           images_lib.preprocess(synthetic.render(sc), size, "pad")
                           for sc in scenes])
        out[start:start + len(scenes)] = np.asarray(embed(params, jnp.asarray(pixels)))
      result.append(out)
  return result


def main(argv):
  del argv
  config = tiny.get_config()
  llm_cfg = ModelConfig.from_config(config.model).llm
  if _DEPTH.value:
    llm_cfg = dataclasses.replace(llm_cfg, depth=_DEPTH.value)
  tok = tokenizer_lib.Tokenizer.load(
      prepare.ensure_builtin_tokenizer(_WORKDIR.value, config.data.builtin_seed))
  seed, sizes = config.data.builtin_seed, config.data.builtin_sizes
  n_train = _N_TRAIN.value or sizes.instruct
  m = config.model.query.num_queries if _LATENTS.value else 0
  train = encode(tok, seed, "instruct", n_train, _TYPES.value, _SYSTEM.value, m,
                 _TEMPLATE.value, _SPLIT.value)
  held = encode(tok, seed, "eval", sizes.eval, (), _SYSTEM.value, m, _TEMPLATE.value)
  if _LATENTS.value:  # Per split: [samples, M, D], indexed by the slots' sample column.
    latents = model_latents(_LATENTS.value, config, seed,
                            (("instruct", n_train), ("eval", sizes.eval)))
  else:
    latents = [np.zeros((1, 1, llm_cfg.width), np.float32)] * 2
  print(f"train {train[0].shape[0]} samples, held-out {held[0].shape[0]} questions, "
        f"length {train[0].shape[1]}", flush=True)

  model = LlamaDecoder(llm_cfg)
  key = jax.random.key(_SEED.value)
  width = llm_cfg.width
  params = {
      "llm": model.init(key, jnp.zeros((1, 8, width)), jnp.zeros((1, 8), jnp.int32),
                        jnp.ones((1, 8, 8), bool))["params"],
      "slots": [0.02 * jax.random.normal(jax.random.fold_in(key, j), (n, width))
                for j, n in enumerate((CELLS, len(synthetic.SHAPES) + 1,
                                       len(synthetic.COLORS) + 1, len(synthetic.SIZES) + 1))],
      "adapter": jnp.eye(width),  # Latent mode: a linear map on the frozen latents.
  }

  def logits_fn(p, ids, slots, lat):
    is_slot = slots[..., 0] >= 0
    mask = attention_mask((ids > 0) | is_slot)
    emb = model.apply({"params": p["llm"]}, ids, method=LlamaDecoder.embed)
    if _LATENTS.value:  # lat [B, M, D]: each slot position takes latent slots[..., 0].
      slot_emb = jnp.take_along_axis(lat, jnp.maximum(slots[..., :1], 0), axis=1) @ p["adapter"]
    else:
      slot_emb = sum(jnp.take(table, jnp.maximum(slots[..., j], 0), axis=0)
                     for j, table in enumerate(p["slots"]))
    emb = jnp.where(is_slot[..., None], slot_emb, emb)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model.apply({"params": p["llm"]}, emb, positions, mask)[0][:, :-1]

  def loss_fn(p, ids, labels, slots, lat):
    target, keep = labels[:, 1:], labels[:, 1:] != IGNORE
    logp = jax.nn.log_softmax(logits_fn(p, ids, slots, lat))
    nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * keep) / jnp.maximum(keep.sum(), 1)

  o = config.stage2.optim
  tx = optax.adamw(optim.schedule(_LR.value, _STEPS.value, o.warmup), b1=o.b1, b2=o.b2,
                   eps=o.eps, weight_decay=o.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s, ids, labels, slots, lat):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids, labels, slots, lat)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  predict = jax.jit(lambda p, ids, slots, lat: jnp.argmax(logits_fn(p, ids, slots, lat), -1))

  def batch_latents(which, slots):
    """The latents of each row's sample (its slots' sample column), or the dummy."""
    table = latents[which]
    return table[np.maximum(slots[:, :, 1].max(1), 0)] if _LATENTS.value else table

  def score(p):
    right = collections.defaultdict(list)
    ids, labels, slots, names = held
    for i in range(0, len(ids), 100):
      pred = np.asarray(predict(p, ids[i:i + 100], slots[i:i + 100],
                                batch_latents(1, slots[i:i + 100])))
      target = labels[i:i + 100, 1:]
      for r in range(len(pred)):
        keep = target[r] != IGNORE
        right[names[i + r]].append(bool((pred[r][keep] == target[r][keep]).all()))
        right[names[i + r].split("/")[0]].append(right[names[i + r]][-1])
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(right.items())}

  rng = np.random.default_rng(_SEED.value)
  history, losses, start = [], [], time.time()
  for i in range(1, _STEPS.value + 1):
    idx = rng.integers(len(train[0]), size=_BATCH.value)
    params, opt_state, loss = step(params, opt_state, *(a[idx] for a in train[:3]),
                                   batch_latents(0, train[2][idx]))
    losses.append(float(loss))
    if i % _EVAL_EVERY.value == 0 or i == _STEPS.value:
      acc = score(params)
      history.append({"step": i, "loss": float(np.mean(losses[-_EVAL_EVERY.value:])), **acc})
      elapsed = time.time() - start
      types = "  ".join(f"{t} {acc[t]:.2f}" for t in synthetic.IMAGE_TYPES if t in acc)
      print(f"step {i}/{_STEPS.value}  loss {history[-1]['loss']:.3f}  {types}  "
            f"({elapsed:.0f} s, ETA {elapsed / i * (_STEPS.value - i):.0f} s)", flush=True)
  out = os.path.join(_WORKDIR.value, "oracle_slots.json")
  with open(out, "w") as f:
    json.dump({"flags": {k: getattr(flags.FLAGS, k) for k in (
        "steps", "batch_size", "lr", "depth", "n_train", "system_prompt", "template",
        "split_rounds", "types", "init_seed", "latents_from")},
               "history": history}, f, indent=1)
  print("per subtype at the end:", json.dumps(history[-1]), f"\nwritten {out}", flush=True)


if __name__ == "__main__":
  app.run(main)
