"""Optimizer: AdamW, warmup + cosine, regex rules for trainable/frozen groups.

Rules come from the config as an ordered list of (regex, lr multiplier or
None) matched against "/"-joined parameter paths (`query/latents/query`,
`llm/layers/q_proj/kernel`); the first match wins, None means frozen, and a
parameter that no rule matches is an error naming it. Frozen parameters get no
optimizer state and no gradient (the train step differentiates only the
trainable subtree).
"""
import re
from typing import Any

import optax
from flax import traverse_util

FROZEN = "frozen"


def schedule(lr: float, total_steps: int, warmup: float) -> optax.Schedule:
  """Linear warmup over `warmup` (a fraction of steps if < 1, else steps), then cosine to 0."""
  warm = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
  warm = min(max(warm, 0), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warm,
      decay_steps=max(total_steps, warm + 1), end_value=0.0)


def param_labels(params, rules) -> Any:
  """Pytree of group labels ("frozen" or "g<i>") from ordered regex rules."""
  compiled = [(re.compile(p), mult) for p, mult in rules]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {}
  for path in flat:
    for i, (rx, mult) in enumerate(compiled):
      if rx.search(path):
        labels[path] = FROZEN if mult is None else f"g{i}"
        break
    else:
      raise ValueError(f"parameter {path} matches no optimizer rule; rules: "
                       f"{[p for p, _ in rules]}")
  return traverse_util.unflatten_dict(labels, sep="/")


def make_optimizer(params, cfg, total_steps: int):
  """cfg: config.optim (lr, warmup, b1, b2, eps, weight_decay, clip_norm, rules).

  Returns (tx, labels, schedule): `tx` acts on the flat dict of trainable
  parameters only ({path: array}, see `partition`); `labels` labels all of them.
  """
  labels = param_labels(params, cfg.rules)
  flat = traverse_util.flatten_dict(labels, sep="/")
  trainable = {k: v for k, v in flat.items() if v != FROZEN}
  if not trainable:
    raise ValueError("the optimizer rules freeze every parameter")
  sched = schedule(cfg.lr, total_steps, cfg.warmup)
  transforms = {}
  for i, (_, mult) in enumerate(cfg.rules):
    if mult is not None and f"g{i}" in trainable.values():
      transforms[f"g{i}"] = optax.adamw(lambda step, m=mult: sched(step) * m, b1=cfg.b1,
                                        b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  tx = optax.multi_transform(transforms, trainable)
  if cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx, labels, sched


def partition(params, labels):
  """-> (trainable, frozen): flat {path: leaf} dicts split by the labels."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat_labels = traverse_util.flatten_dict(labels, sep="/")
  trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
  return trainable, frozen


def combine(trainable, frozen):
  """Inverse of `partition`: a nested parameter tree."""
  return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")
