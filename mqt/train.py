"""Training: the two-stage Matryoshka recipe, sharded over a mesh, resumable.

`train_and_evaluate(config, workdir)` runs the stages named in
`config.run_stages` (each `config.stage<N>` has its own data, optimizer rules
and m distribution), checkpointing each under `workdir/stage<N>`, then
evaluates teacher-forced answer accuracy per m on the held-out split
(`mqt.train_eval`).

Train state (a plain pytree, `mqt.params.abstract_train_state`): {"params",
"opt_state", "step"}. The jitted step (`mqt.train_step`) takes the state (donated),
a batch sharded over data x fsdp, and the step's m values as data. Before anything
is allocated, every stage's step is compiled on abstract shapes and its memory per
device checked (`mqt.plan`; `--dry_run` stops there).
"""
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from mqt import checkpoint as ckpt_lib
from mqt import cli
from mqt import config_lib
from mqt import distributed
from mqt import metrics as metrics_lib
from mqt import paths
from mqt import preemption
from mqt import run_inputs
from mqt import sharding as shard_lib
from mqt import train_eval
from mqt.model import ModelConfig
from mqt.params import fresh_params, load_params, model_config, random_params, reinit_params
from mqt.params import shardings_of
from mqt.plan import StagePlan, check_batch_size, check_eval_ms, plan_stage, plan_stages
from mqt.plan import write_dry_run
from mqt.run_inputs import stages_to_run


class NonFiniteLossError(FloatingPointError):
  """A step gave a non-finite loss, gradient norm, parameter or optimizer state; its
  update was not adopted and nothing non-finite was saved."""


@dataclasses.dataclass
class StageResult:
  params: object
  final_step: int
  losses: list  # The last metrics_lib.LAST_LOSSES losses (across resumes).
  summary: dict = dataclasses.field(default_factory=dict)  # StageRecord.summary.


def data_position(it, offset: int, worker_count: int) -> dict:
  """The data state a checkpoint stores: {"offset", "worker_count", "grain"}."""
  return {"offset": int(offset), "worker_count": int(worker_count), "grain": it.get_state()}


def agree_on_position(position: dict, name: str, step: int) -> None:
  """Several processes: each iterates over its own rows of the same global batches, so
  their data positions must be equal (process 0's is the one saved); else an error."""
  positions = distributed.allgather_json(position)
  differ = [i for i, p in enumerate(positions) if p != positions[0]]
  if differ:
    raise RuntimeError(f"[{name}] at step {step} the data position of process(es) {differ} "
                       f"differs from process 0's ({positions[differ[0]]} against "
                       f"{positions[0]}); the checkpoint would not resume them all")


def _non_finite(loss: float, grad_norm: float, out) -> list[str]:
  """Which of loss / gradient norm / parameters / optimizer state are not finite."""
  checks = (("loss", math.isfinite(loss)), ("gradient norm", math.isfinite(grad_norm)),
            ("parameters", bool(out["params_finite"])),
            ("optimizer state", bool(out["opt_state_finite"])))
  return [what for what, ok in checks if not ok]


def _non_finite_error(name, stage_cfg, step, loss, grad_norm, ms, bad, ckpt):
  """The one-line NonFiniteLossError of a step whose update is not adopted."""
  good = ckpt.last_good_step()
  kept = (f"The last good checkpoint (step {good}) in {ckpt.directory} is kept."
          if good is not None else f"No checkpoint was written before it in {ckpt.directory}.")
  lr = float(stage_cfg.optim.lr)
  hint = (f" --config.{name}.optim.lr={lr:g} is not finite in float32: lower it."
          if not abs(lr) <= np.finfo(np.float32).max else "")
  return NonFiniteLossError(
      f"[{name}] loss {loss}, gradient norm {grad_norm} at step {step} (m={ms.tolist()}): "
      f"non-finite {', '.join(bad)}; stopping without adopting or saving this update. "
      f"{kept}{hint}")


def _start_state(config, n, model_cfg, model, plan, ckpt, init_params):
  """The stage's state: its newest checkpoint that restores, else a fresh one.
  -> (state, data state or None, run record state or None, restored step or None)."""
  name, stage_cfg = f"stage{n}", config[f"stage{n}"]
  resumed = ckpt.restore_latest(plan.abstract_state, say=distributed.say)
  if resumed is not None:
    step, items = resumed
    logging.info("%s: resumed from step %d", name, step)
    distributed.say(f"[{name}] resumed from checkpoint at step {step}")
    if "run" not in items:
      distributed.say(f"[{name}] the checkpoint of step {step} has no run record (an older "
                      f"version wrote it): final_loss and the data counts cover the steps "
                      f"from {step} on")
    return items["state"], items.get("data"), items.get("run"), step
  p_shard = shardings_of(plan.abstract_state)["params"]
  params = init_params if init_params is not None else fresh_params(
      config, model_cfg, model, p_shard)
  if init_params is not None and stage_cfg.get("reinit"):
    params = reinit_params(params, stage_cfg.reinit,
                           random_params(config.seed + n, model_cfg, model, p_shard,
                                         only=stage_cfg.reinit), name)
  params = jax.device_put(params, p_shard)
  state = jax.jit(plan.make_state, out_shardings=shardings_of(plan.abstract_state))(params)
  return state, None, None, None


def train_stage(config, n: int, model_cfg: ModelConfig, mesh, workdir: str, init_params=None,
                plan: StagePlan | None = None,
                watch: preemption.Watch | None = None) -> StageResult:
  """Runs (or resumes) one stage; returns its final parameters and its summary entry.
  `plan`: the stage's `plan_stage` (compiled here when not given).

  Resumes from the newest checkpoint that restores (newer unreadable ones are moved
  aside), with the data position and the run record (last losses, data ledger) it
  holds. A step whose loss, gradient norm, new parameters or optimizer state is not
  finite raises NonFiniteLossError without adopting or saving it; a checkpoint that
  cannot be written raises checkpoint.CheckpointWriteError. SIGTERM / SIGINT (`watch`,
  active for the whole run; else one for this stage) end the step in progress, write its
  checkpoint and raise preemption.Preempted."""
  name, stage_cfg = f"stage{n}", config[f"stage{n}"]
  plan = plan or plan_stage(config, n, model_cfg, mesh)
  model, sampler, sched = plan.model, plan.sampler, plan.sched
  total = int(stage_cfg.steps)
  stage_dir = paths.join(workdir, name)
  ckpt = ckpt_lib.Checkpointer(paths.join(stage_dir, "checkpoints"), config.checkpoint.every,
                               config.checkpoint.keep, config.checkpoint.use_async, name=name)
  source = run_inputs.open_source(config, stage_cfg.data, workdir, on_error=config.data.on_error)
  pcfg = run_inputs.pipeline_config(config, stage_cfg.data, model_cfg, workdir, train=True,
                         where=f"config.{name}.data")
  say = lambda line: distributed.say(f"[{name}] {line}")
  state, data_state, run_state, restored = _start_state(
      config, n, model_cfg, model, plan, ckpt, init_params)
  start = int(jax.device_get(state["step"]))
  record = (metrics_lib.StageRecord.from_state(run_state, source, log=say) if run_state
            else metrics_lib.StageRecord.start(source, log=say))
  record.add_problems(run_inputs.text_problems_up_front(source, pcfg, config.data.on_error, say))
  it, offset = run_inputs.data_iterator(source, pcfg, name, start,
                             data_state if restored is not None else None)
  progress = metrics_lib.Progress(stage_dir, name, total, first_step=start,
                                  every=config.log_every, is_main=jax.process_index() == 0)
  finished = False
  own_watch = watch is None
  watch = watch or preemption.Watch().__enter__()
  try:
    for step in range(start, total):
      batch = next(it)
      record.add_batch(batch)
      ms = sampler.sample(step)
      device_batch = shard_lib.put_batch(batch, mesh)
      bucket = sampler.bucket(ms)
      if bucket not in plan.steps:
        say(f"compiling the step for m <= {bucket} ({bucket} visual slots)")
      new_state, out = plan.step_for(bucket)(
          state, device_batch, jax.device_put(ms, shard_lib.replicated(mesh)))
      loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
      bad = _non_finite(loss, grad_norm, out)
      if bad:  # Not adopted, so nothing non-finite is saved.
        raise _non_finite_error(name, stage_cfg, step + 1, loss, grad_norm, ms, bad, ckpt)
      state = new_state
      record.add_loss(loss)
      progress.update(step + 1, {"loss": loss, "m": float(ms.mean()),
                                 "grad_norm": grad_norm,
                                 "lr": float(sched(step)), "skipped": record.skipped,
                                 "truncated": record.truncated},
                      tokens=_input_tokens(batch if jax.process_count() == 1 else device_batch,
                                           ms, model_cfg.image_token_id))
      stop = step + 1 < total and watch.requested
      force = step + 1 == total or stop
      position = data_position(it, offset, pcfg.worker_count)
      if jax.process_count() > 1 and ckpt.due(step + 1, force):
        record.merge_processes(distributed.allgather_json)
        agree_on_position(position, name, step + 1)
      ckpt.save(step + 1, state, position, force=force, run_state=record.state())
      if stop:
        ckpt.wait()
        raise preemption.Preempted(
            f"[{name}] stopped on {watch.signal_name or 'a signal in another process'} at "
            f"step {step + 1}/{total}; its checkpoint is in {ckpt.step_path(step + 1)}. "
            f"Run the same command again to continue.")
    finished = True
  finally:
    if own_watch:
      watch.__exit__(None, None, None)
    progress.close()
    ckpt.close(quiet=not finished)
  return StageResult(params=state["params"], final_step=total, losses=list(record.losses),
                     summary=record.summary(total))


def _input_tokens(batch, ms, image_token_id: int) -> int:
  """Tokens the LLM reads in this step: text plus the m visual tokens of each image row
  (which replace its placeholder), once per m of the step. `batch`: the host batch (one
  process) or the global device batch (several: each host holds only its rows)."""
  xp = np if isinstance(batch["input_ids"], np.ndarray) else jnp
  image_rows = int(xp.sum(xp.any(batch["input_ids"] == image_token_id, axis=1)))
  text = int(xp.sum(batch["text_mask"]))
  return sum(text + image_rows * (int(m) - 1) for m in ms)


def train_and_evaluate(config, workdir: str, dry_run: bool = False) -> dict:
  """Runs `config.run_stages` in order, then the held-out evaluation. Every stage's
  step is compiled (and its memory checked) first, before any parameter exists.

  dry_run: only that (no data, weights or tokenizer are read); writes and returns the
  figures of `write_dry_run`."""
  t0 = time.perf_counter()
  for note in config_lib.infer_data_kinds(config, cli.user_settings()):
    distributed.say(f"note: {note}")
  if not dry_run:
    run_inputs.check_paths(config)
    run_inputs.check_builtin_dir(config, workdir)
  paths.makedirs(workdir)
  distributed.initialize(config)
  model_cfg = model_config(config)
  check_eval_ms(config, model_cfg)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es)", flush=True)
  for n in stages_to_run(config):
    check_batch_size(f"stage{n}.data.batch_size", config[f"stage{n}"].data.batch_size, mesh,
                     int(config[f"stage{n}"].accum_steps))
  if config.eval.ms and not dry_run:
    check_batch_size("eval.data.batch_size", config.eval.data.batch_size, mesh)
  summary = {"stages": {}}
  params = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.logical_axis_rules)):
    plans = plan_stages(config, model_cfg, mesh, dry_run=dry_run)
    if dry_run:
      return write_dry_run(workdir, plans)
    with preemption.Watch() as watch:
      for n in stages_to_run(config):
        stage_cfg = config[f"stage{n}"]
        init_params = params
        if init_params is None and stage_cfg.init_from:
          init_params = load_params(stage_cfg.init_from, model_cfg, mesh, config)
        result = train_stage(config, n, model_cfg, mesh, workdir, init_params, plans.pop(n),
                             watch)
        params = result.params
        summary["stages"][f"stage{n}"] = result.summary
        if watch.requested:  # Arrived in the stage's last step: the stage is saved whole.
          raise preemption.Preempted(
              f"[stage{n}] stopped on {watch.signal_name or 'a signal in another process'} "
              f"after its last step ({result.final_step}); its checkpoint is in "
              f"{paths.join(workdir, f'stage{n}', 'checkpoints')}. Run the same command "
              f"again to continue.")
    skipped = run_inputs.eval_skip_reason(config)
    if skipped and config.eval.ms and params is not None:
      distributed.say(f"the end-of-run evaluation is skipped: {skipped}")
      summary["eval"] = {"skipped": skipped}
    elif config.eval.ms and params is not None:
      ms = [int(m) for m in config.eval.ms]
      result = train_eval.evaluate(config, params, model_cfg, mesh, ms, workdir)
      chance = {**run_inputs.chance_rates(config.eval.data, result.pop("metas")),
                **dict(config.eval.get("chance", {}) or {})}
      table = train_eval.format_table(result, ms, chance)
      distributed.say("\nheld-out teacher-forced answer accuracy per m:\n" + table)
      summary["eval"] = {"ms": ms, "chance": chance, **{k: {str(kk): vv for kk, vv in v.items()}
                                     for k, v in result.items() if k != "accuracy"},
                         "accuracy": {k: {str(m): a for m, a in v.items()}
                                      for k, v in result["accuracy"].items()}}
  summary["wall_time_s"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    path = metrics_lib.write_summary(workdir, summary)
    print(f"summary written to {path} ({summary['wall_time_s']:.0f} s)", flush=True)
  return summary


