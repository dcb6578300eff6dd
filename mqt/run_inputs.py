"""The inputs of a run: the paths it needs, its data sources, tokenizer and pipelines.

Everything that turns a config's data blocks and file settings into things a
trainer, an evaluator or an inference program reads: the built-in set (prepared on
first use), record sources, the tokenizer path, pipeline configs, and the up-front
checks that name a missing file by its config field before any compute.
"""
import os
import shutil

import jax
from jax.experimental import multihost_utils

from data import pipeline
from data import prepare
from data import records
from data import sources
from data import synthetic
from data import tokenizer as tokenizer_lib
from mqt import config_lib
from mqt import distributed
from mqt import paths
from mqt.model import ModelConfig
from mqt.params import TOKENIZER_WHAT, hf_init_problems, path_problem


def builtin_dir(config, workdir: str) -> str:
  return config.data.data_dir or paths.join(workdir, "data")


def builtin_dir_problem(config, workdir: str) -> str | None:
  """The built-in set (data and benchmarks) is generated and read on local disk: why
  `builtin_dir` cannot hold it (a cloud workdir without config.data.data_dir), or None."""
  where = builtin_dir(config, workdir)
  if paths.is_uri(where):
    return (f"the built-in data is prepared on local disk, not in {where}: set "
            f"--config.data.data_dir to a local folder (the workdir can stay in the cloud)")
  return None


def check_builtin_dir(config, workdir: str) -> None:
  """`builtin_dir_problem` as a ValueError, where a stage or the evaluation reads the
  built-in set."""
  blocks = [config[f"stage{n}"].data for n in stages_to_run(config)] + [config.eval.data]
  problem = builtin_dir_problem(config, workdir)
  if problem and any(b.kind == "builtin" for b in blocks):
    raise ValueError(problem)


def prepare_builtin(config, workdir: str) -> str:
  """Prepares the built-in set under `builtin_dir` unless it is there; -> its root.

  With several processes (a pod), process 0 prepares first and the others wait
  at a barrier, then find it ready (a shared disk) or prepare their own copy (a
  host-local disk; `ensure_builtin`'s file lock makes processes on one host take
  turns). The barrier is for shared network disks, where file locks may not hold."""
  prep = lambda: prepare.ensure_builtin(
      builtin_dir(config, workdir), seed=config.data.builtin_seed,
      image_size=config.data.builtin_image_size, sizes=dict(config.data.builtin_sizes))
  if jax.process_count() == 1:
    return prep()
  root = prep() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("mqt: built-in data prepared")
  return root or prep()


def open_source(config, data_cfg, workdir: str, on_error: str = "fail"):
  """A data block (stage or eval) -> a record source (data/sources.py).

  Its paths were validated by `check_paths` (train_and_evaluate calls it first).
  on_error: "fail" (the first unusable record of a JSON file is an error) or "skip"
  (unusable records are left out and listed in the source's `problems`)."""
  split = data_cfg.split
  if data_cfg.kind == "builtin":
    source = sources.TfdsSource(prepare_builtin(config, workdir), split)
  elif data_cfg.kind == "tfds":
    source = sources.TfdsSource(data_cfg.dataset_dir, split)
  elif data_cfg.kind == "json":
    source = sources.LlavaJsonSource(data_cfg.json_path, data_cfg.image_folder, on_error)
  else:
    raise ValueError(f"unknown data.kind {data_cfg.kind!r} (builtin | tfds | json)")
  return sources.RoundsSource(source) if data_cfg.get("split_rounds") else source


def tokenizer_path(config, data_cfg, workdir: str) -> str:
  """The configured tokenizer (validated by `check_paths`), else the built-in set's own."""
  if data_cfg.kind == "builtin" and not config.tokenizer_path:
    return prepare.builtin_tokenizer_path(builtin_dir(config, workdir))
  return config.tokenizer_path


def pipeline_config(config, d, model_cfg: ModelConfig, workdir: str, *, train: bool,
                    where: str = ""):
  """A data block -> data.pipeline.PipelineConfig (eval: one ordered pass, fail on errors)."""
  max_text_len = config_lib.max_text_len(config, d, where)
  tok_path = tokenizer_path(config, d, workdir)
  vocab = tokenizer_lib.Tokenizer.load(tok_path).vocab_size
  if vocab > model_cfg.llm.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {vocab} pieces but the model's vocabulary is "
                     f"{model_cfg.llm.vocab_size} (config.model.llm.vocab_size)")
  return pipeline.PipelineConfig(
      batch_size=d.batch_size, max_text_len=max_text_len,
      image_size=model_cfg.vision.image_size, template=d.template, image_mode=d.image_mode,
      tokenizer_path=tok_path, seed=config.seed, shuffle=train,
      group_by_modality=train and d.group_by_modality, num_epochs=None if train else 1,
      overlong=config.data.overlong, on_error=config.data.on_error if train else "fail",
      worker_count=config.data.worker_count if train else 0,
      process_index=jax.process_index(), process_count=jax.process_count())


def data_iterator(source, pcfg, name: str, step: int, data_state):
  """The stage's batches from global batch `step` on; -> (iterator, offset).

  data_state: what `data_position` saved ({"offset", "worker_count", "grain"}), a
  grain state of an older checkpoint, or None (a fresh stage). grain's state is
  applied where it fits (same worker_count); else the dataset starts at `step`,
  which gives the same batches (each batch is a function of its global step),
  and one line says so. offset: the global batch number the dataset starts at."""
  if data_state is None:
    if step:
      distributed.say(f"[{name}] the checkpoint of step {step} holds no data position; the "
                      f"data position was taken from the step")
    return iter(pipeline.make_dataset(source, pcfg, start_step=step)), step
  saved = (data_state if isinstance(data_state, dict) and "offset" in data_state
           else {"offset": 0, "worker_count": None, "grain": data_state})
  workers = pcfg.worker_count
  if saved["worker_count"] in (None, workers):
    it = iter(pipeline.make_dataset(source, pcfg, start_step=int(saved["offset"])))
    try:
      it.set_state(saved["grain"])
      return it, int(saved["offset"])
    except Exception as e:  # pylint: disable=broad-except
      why = f"its grain state cannot be applied ({type(e).__name__}: {e})"
  else:
    why = (f"the checkpoint was written with data.worker_count={saved['worker_count']}, "
           f"this run has {workers}")
  distributed.say(f"[{name}] the data position was taken from the step ({step}): {why}")
  return iter(pipeline.make_dataset(source, pcfg, start_step=step)), step


def text_problems_up_front(source, pcfg, on_error: str, say=print) -> list:
  """For a LLaVA JSON source (records in memory, already judged for structure and
  images): every sample tokenized once before training, so that an over-long or
  untemplatable record is named (on_error="fail": a DataError) or counted (skip) before
  the first step, not when (if ever) its row comes up. Other sources (a prepared TFDS
  folder, whose records carry their image bytes) are counted as their rows come up.
  -> the problems (records.Problem) found."""
  base = getattr(source, "_source", source)
  if not isinstance(base, sources.LlavaJsonSource):
    return []
  found = pipeline.text_problems(source, pcfg, progress=say)
  if found and on_error == "fail":
    raise records.DataError(records.fail_message(found[0]))
  return found


def stages_to_run(config) -> list[int]:
  return [int(x) for x in str(config.run_stages).split(",") if x.strip()]


def check_paths(config) -> None:
  """Fails before any compute when a file or folder the run needs is not configured or
  missing; the message names the config field (`--config.<field>=...`)."""
  problems = []

  def need(field, value, what):
    problem = path_problem(field, value, what)
    if problem:
      problems.append(problem)

  blocks = [(f"stage{n}", config[f"stage{n}"].data) for n in stages_to_run(config)]
  if config.eval.ms:
    blocks.append(("eval", config.eval.data))
  for name, d in blocks:
    if d.kind == "tfds":
      need(f"{name}.data.dataset_dir", d.dataset_dir, "a folder prepared by python -m data.prepare")
    elif d.kind == "json":
      need(f"{name}.data.json_path", d.json_path, "a LLaVA conversation JSON")
      need(f"{name}.data.image_folder", d.image_folder, "the folder its image paths start in")
    elif d.kind != "builtin":
      problems.append(f"--config.{name}.data.kind={d.kind!r}: choose builtin | tfds | json")
    if d.kind != "builtin" or config.tokenizer_path:
      need("tokenizer_path", config.tokenizer_path, TOKENIZER_WHAT)
  first = stages_to_run(config)[:1]
  if first and (config[f"stage{first[0]}"].init_from or config.init.kind == "checkpoint"):
    need(f"stage{first[0]}.init_from", config[f"stage{first[0]}"].init_from,
         "the checkpoints folder of an earlier stage")
  elif config.init.kind == "hf":
    problems += hf_init_problems(config)
  problems = list(dict.fromkeys(problems))  # Once each, in order.
  if problems:
    raise ValueError("this run cannot start:\n  " + "\n  ".join(problems))


def eval_skip_reason(config) -> str | None:
  """Why the end-of-run evaluation must not run (None: it runs): a stage trains on the
  user's data (kind json / tfds) while config.eval.data is still the built-in set, whose
  accuracy would say nothing about that training."""
  if config.eval.data.kind != "builtin":
    return None
  users = [f"stage{n}" for n in stages_to_run(config)
           if config[f"stage{n}"].data.kind in ("json", "tfds")]
  if not users:
    return None
  return (f"{', '.join(users)} trains on your data (kind "
          f"{config[users[0]].data.kind}) but config.eval.data is the built-in synthetic "
          f"set; set --config.eval.data.json_path=<held-out LLaVA JSON> and "
          f"--config.eval.data.image_folder=<its images> (or eval.data.dataset_dir) to "
          f"evaluate on held-out data")


def default_checkpoint(config, workdir: str) -> str:
  stages = stages_to_run(config)
  return paths.join(workdir, f"stage{stages[-1] if stages else 2}", "checkpoints")


def resolve_paths(config, workdir: str, checkpoint: str = "", need_tokenizer: bool = True
                  ) -> tuple[str, str]:
  """-> (checkpoint folder or "hf", tokenizer path); a ValueError lists every problem.
  need_tokenizer=False: the tokenizer is neither checked nor needed."""
  problems = []
  checkpoint = checkpoint or default_checkpoint(config, workdir)
  if checkpoint == "hf":
    problems += hf_init_problems(config)
  elif not paths.isdir(checkpoint):
    problems.append(f"checkpoint folder {checkpoint} does not exist (train first with "
                    f"python train.py --workdir=..., or pass --checkpoint=DIR or =hf)")
  tok = tokenizer_path(config, config.eval.data, workdir)
  if need_tokenizer:
    if config.tokenizer_path or config.eval.data.kind != "builtin":
      problems.append(path_problem("tokenizer_path", config.tokenizer_path, TOKENIZER_WHAT))
    elif not paths.isfile(tok):
      problems.append(f"the built-in tokenizer {tok} does not exist (train.py writes it; or "
                      f"set --config.tokenizer_path)")
  problems = [p for p in problems if p]
  if problems:
    raise ValueError("cannot load the model:\n  " + "\n  ".join(problems))
  return checkpoint, tok


def chance_rates(data_cfg, metas) -> dict:
  """Per question type, the accuracy of an image-blind guesser that answers the most
  frequent answer of each question form (records of the built-in set carry their type,
  form and answer); {} for other data."""
  if data_cfg.kind != "builtin" or not metas or not all(
      isinstance(r, dict) and "type" in r and "answer" in r for r in metas):
    return {}
  try:
    return synthetic.chance_rates(metas)["majority"]
  except (KeyError, ValueError):  # Types the built-in set does not define.
    return {}


BUILTIN_BENCHMARKS = "mqt_synthetic_benchmarks"  # The folder under `builtin_dir`.


def builtin_benchmark_dir(config, workdir: str) -> str:
  """Where the built-in benchmark files (the synthetic held-out splits in the published
  benchmark formats) are written by `prepare_builtin_benchmarks` and read by the sweep."""
  return os.path.join(builtin_dir(config, workdir), BUILTIN_BENCHMARKS)


def prepare_builtin_benchmarks(config, workdir: str) -> str:
  """Writes the built-in benchmark files into `builtin_benchmark_dir` unless they
  are there (written once, atomically); files written with other settings are an error.
  -> that folder."""
  root = builtin_benchmark_dir(config, workdir)
  wanted = {"seed": int(config.data.builtin_seed),
            "image_size": int(config.data.builtin_image_size),
            "n_eval_per_type": int(config.data.builtin_sizes.eval) // len(synthetic.IMAGE_TYPES),
            "version": synthetic.DATA_VERSION}
  stamp = os.path.join(root, "settings.json")
  if os.path.exists(stamp):
    prepare.check_settings(stamp, wanted, root, "the built-in benchmark files")
    return root
  tmp = root + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  print(f"writing the built-in benchmark files -> {root}", flush=True)
  synthetic.generate(tmp, seed=wanted["seed"], image_size=wanted["image_size"], n_caption=0,
                     n_instruct=0, n_eval_per_type=wanted["n_eval_per_type"])
  prepare.write_json_atomic(os.path.join(tmp, "settings.json"), wanted)
  os.replace(tmp, root)  # Only a complete folder ever has the final name.
  return root


def synthetic_chance(questions) -> float:
  """The accuracy of uniform guessing on built-in synthetic questions: the mean over the
  questions of 1 / the number of answers their form allows."""
  return sum(1.0 / synthetic.n_answers(q.meta) for q in questions) / len(questions)
