"""The trainer's end-of-run evaluation: teacher-forced answer accuracy per m and
question type on the held-out split (fast: one forward per batch and m, no decoding).
"""
import jax
import jax.numpy as jnp
import numpy as np

from data import pipeline
from mqt import distributed
from mqt import matryoshka
from mqt import sharding as shard_lib
from mqt.benchmarks import table
from mqt.benchmarks.table import Column, Row
from mqt.model import IGNORE, MQTLLaVA, ModelConfig, next_token_loss
from mqt.run_inputs import open_source, pipeline_config


def make_eval_step(model: MQTLLaVA):
  def step(params, batch, m):
    logits, layout = model.apply({"params": params}, batch["images"], batch["input_ids"],
                                 batch["text_mask"], m)
    target = layout.gather_labels(batch["labels"])[:, 1:]
    pred = jnp.argmax(logits[:, :-1], axis=-1)
    labelled = target != IGNORE
    correct = jnp.all(jnp.where(labelled, pred == target, True), axis=1) & labelled.any(axis=1)
    _, aux = next_token_loss(logits, layout, batch["labels"])
    return correct, aux["loss_sum"], aux["tokens"]
  return step


def evaluate(config, params, model_cfg: ModelConfig, mesh, ms, workdir: str) -> dict:
  """-> {"accuracy": {type: {m: acc}}, "loss": {m: loss}, "count": {type: n},
  "metas": the records' metadata (for the caller's chance rates)}."""
  source = open_source(config, config.eval.data, workdir)
  pcfg = pipeline_config(config, config.eval.data, model_cfg, workdir, train=False,
                         where="config.eval.data")
  model = MQTLLaVA(model_cfg)
  step = jax.jit(make_eval_step(model))
  batches = list(pipeline.make_dataset(source, pcfg))
  correct = {m: {} for m in ms}
  loss = {}
  for m in ms:
    matryoshka.validate_m(m, model_cfg.query.num_queries)
    s_tot, n_tot = 0.0, 0
    for batch in batches:
      ok, s, n = step(params, shard_lib.put_batch(batch, mesh), jnp.int32(m))
      ok = shard_lib.local_rows(ok)
      s_tot, n_tot = s_tot + float(s), n_tot + int(n)
      for r, meta in enumerate(batch["meta"]):
        if batch["empty"][r]:
          continue
        kind = (meta or {}).get("type", "all")
        correct[m].setdefault(kind, []).append(bool(ok[r]))
    loss[m] = s_tot / max(n_tot, 1)
  metas = [meta for b in batches for meta, e in zip(b["meta"], b["empty"]) if not e]
  if jax.process_count() > 1:  # Each process scored its own rows.
    parts = distributed.allgather_json({"correct": {str(m): c for m, c in correct.items()},
                                        "metas": metas})
    correct = {m: {} for m in ms}
    for part in parts:
      for m in ms:
        for kind, oks in part["correct"][str(m)].items():
          correct[m].setdefault(kind, []).extend(oks)
    metas = [meta for part in parts for meta in part["metas"]]
  kinds = sorted(correct[ms[0]])
  acc = {k: {m: float(np.mean(correct[m][k])) for m in ms} for k in kinds}
  counts = {k: len(correct[ms[0]][k]) for k in kinds}
  return {"accuracy": acc, "loss": loss, "count": counts, "metas": metas}


def format_table(result: dict, ms, chance: dict | None = None) -> str:
  """The evaluation as text: a row per question type (n, chance, accuracy per m), then
  the loss per m."""
  chance = chance or {}
  cols = [Column("n", 5, ""), Column("chance", 8, ".2f")] + [Column(f"m={m}", 8) for m in ms]
  rows = [Row(k, [result["count"][k], chance.get(k)] + [r[m] for m in ms])
          for k, r in result["accuracy"].items()]
  rows.append(Row("loss", [None, None] + [result["loss"][m] for m in ms]))
  return table.format_table(cols, rows, label=("question type", 14))
