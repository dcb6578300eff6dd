r"""Answer a question about images with a trained MQT-LLaVA at a chosen m.

  python predict.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --m=4 \
      --image=photo.png --prompt="What color is the circle?"

Every problem of the command line, the config (mqt/validate.py), its files and
checkpoints is named at once, as `error: ...` lines, before any work starts (exit
status 2; --debug shows the traceback).

  python predict.py ... --flops_budget=5e7 --image=photo.png --prompt="..."
  python predict.py ... --latency_budget_ms=40 --image=photo.png --prompt="..."

Exactly one of --m (1 <= m <= M), --flops_budget or --latency_budget_ms chooses m:
there is no silent default. A budget picks the largest m whose cost per image fits
(mqt/budget.py): the analytic FLOPs of the prompt pass and max_new_tokens decoded
tokens at this prompt's length, or the latency measured by latency.py on this
machine (read from the table beside the checkpoint, or --latency_table). The chosen
m and why go to stderr; stdout holds only the answers. Several --image flags
answer the same prompt for each image in one batch. The memory the run needs is
printed before any weight is read; a run that cannot fit stops there. --dry_run
prints it and stops (no weights or images are read).
"""

import sys

from absl import flags

from data import tokenizer as tokenizer_lib
from mqt import budget
from mqt import cli
from mqt import inference
from mqt import paths
from mqt import run_inputs
from mqt import validate

_CONFIG, _WORKDIR, _CHECKPOINT = cli.define_model_flags()
_IMAGES = flags.DEFINE_multi_string("image", None, "Image file(s).")
_PROMPT = flags.DEFINE_string("prompt", None, "The question.")
_M = flags.DEFINE_integer("m", None, "Visual tokens per image, 1 <= m <= M (or choose m "
                         "with --flops_budget or --latency_budget_ms: exactly one of the three).")
_FLOPS_BUDGET = flags.DEFINE_float(
    "flops_budget", None, "FLOPs per image: the largest m whose analytic FLOPs (prompt pass "
    "plus max_new_tokens decoded tokens, at this prompt's length) fit.")
_LATENCY_BUDGET = flags.DEFINE_float(
    "latency_budget_ms", None, "Milliseconds per image: the largest m whose latency, measured "
    "at batch 1 on this machine by latency.py, fits (interpolated between measured m; several "
    "--image flags run in one batch, which takes longer).")
_LATENCY_TABLE = flags.DEFINE_string(
    "latency_table", "", "The latency table --latency_budget_ms reads (default: latency.json "
    "beside the checkpoint; <workdir>/latency_hf.json for --checkpoint=hf).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: config.eval.generation.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0: greedy. Default: config.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass. Default: config.")
flags.mark_flags_as_required(["config", "workdir", "image", "prompt"])


def selection_problems(config) -> list[str]:
  """Exactly one of --m / --flops_budget / --latency_budget_ms, each valid (M known later
  for --checkpoint=hf), --latency_table only with the latency budget, and
  --max_new_tokens: what choosing m needs."""
  big_m = None if _CHECKPOINT.value == "hf" else validate.num_queries(config)
  given = [f"--{f.name}={f.value:g}" if isinstance(f.value, float) else f"--{f.name}={f.value}"
           for f in (_M, _FLOPS_BUDGET, _LATENCY_BUDGET) if f.value is not None]
  problems = []
  if len(given) != 1:
    problems.append("give exactly one of --m, --flops_budget, --latency_budget_ms (got "
                    f"{' and '.join(given) or 'none'})")
  if _M.value is not None:
    problems += validate.ms_problems(f"--m={_M.value}", [_M.value], big_m)
  problems += budget.flag_problems(_FLOPS_BUDGET.value, _LATENCY_BUDGET.value,
                                   _LATENCY_TABLE.value)
  if _MAX_NEW.value is not None and _MAX_NEW.value < 1:
    problems.append(f"--max_new_tokens={_MAX_NEW.value} must be >= 1")
  return problems


def command_line_problems(config, dry_run: bool) -> list[str]:
  """The sampling flags, --prompt and the images (unless a dry run, which reads none)."""
  problems = []
  if _TEMPERATURE.value is not None and _TEMPERATURE.value < 0:
    problems.append(f"--temperature={_TEMPERATURE.value} must be >= 0 (0: greedy)")
  if _TOP_P.value is not None and not 0 < _TOP_P.value <= 1:
    problems.append(f"--top_p={_TOP_P.value} must lie in (0, 1]")
  if not _PROMPT.value.strip():
    problems.append("--prompt is empty: ask a question")
  if not dry_run:
    problems += [f"image {p} does not exist" for p in _IMAGES.value if not paths.isfile(p)]
  return problems


def generation_config(config):
  """config.eval.generation with the sampling flags applied."""
  gen_cfg = config.eval.generation.copy_and_resolve_references()
  with gen_cfg.unlocked():
    for key, flag in (("max_new_tokens", _MAX_NEW), ("temperature", _TEMPERATURE),
                      ("top_p", _TOP_P)):
      if flag.value is not None:
        gen_cfg[key] = flag.value
  return gen_cfg


def choose_m(config, workdir: str, found: cli.Problems):
  """m from --m or a budget, at the prompt's length (the tokenizer alone; the latency
  table is read here) -> (m, why), or None with the problem in `found`."""
  try:
    checkpoint, tok_path = run_inputs.resolve_paths(config, workdir, _CHECKPOINT.value)
  except ValueError:
    return None  # Named by inference.load_problems.
  table = None
  if _LATENCY_BUDGET.value is not None:
    path = _LATENCY_TABLE.value or budget.table_path(checkpoint, workdir)
    table = found.check(budget.LatencyTable.load, path)
    if table is None:
      return None
  model_cfg = found.check(inference.model_config, config, checkpoint)
  tok = found.check(tokenizer_lib.Tokenizer.load, tok_path)
  if model_cfg is None or tok is None:
    return None
  prompt = inference.encode_prompt(_PROMPT.value, tok, True, config.eval.data.template)
  return found.check(budget.choose_m, model_cfg, len(prompt),
                     int(generation_config(config).max_new_tokens), m=_M.value,
                     flops_budget=_FLOPS_BUDGET.value, latency_budget_ms=_LATENCY_BUDGET.value,
                     table=table)


def preflight(config, workdir: str, dry_run: bool):
  """Every problem of the command line, the config, the paths, the checkpoint and the
  choice of m, named together before any weight, image or compile (a UserError, exit
  status 2). -> (m, the line saying why)."""
  found = cli.Problems()
  selection = selection_problems(config)
  found.add(selection + command_line_problems(config, dry_run))
  hf = _CHECKPOINT.value == "hf"
  inference.load_problems(found, config, workdir, _CHECKPOINT.value,
                          skip=("eval.ms",) + (("stage",) if hf else ()))
  choice = None if selection else choose_m(config, workdir, found)
  found.raise_if_any()
  return choice


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  dry_run = cli.DRY_RUN.value
  m, why = preflight(config, _WORKDIR.value, dry_run)
  print(why, file=sys.stderr, flush=True)  # stdout: the answers.
  gen_cfg = generation_config(config)
  if not dry_run:
    inference.check_images(_IMAGES.value)
  checkpoint, tok_path = run_inputs.resolve_paths(config, _WORKDIR.value, _CHECKPOINT.value)
  model_cfg = inference.model_config(config, checkpoint)
  questions = [_PROMPT.value] * len(_IMAGES.value)
  prompts, sampling = inference.encode_prompts(config, tok_path, _IMAGES.value, questions,
                                               gen_cfg)
  inference.plan_memory(config, model_cfg, m, len(prompts), max(map(len, prompts)), sampling,
                        dry_run)
  if dry_run:
    return
  loaded = inference.load(config, _WORKDIR.value, _CHECKPOINT.value, model_cfg)
  answers = inference.answer(loaded, _IMAGES.value, questions, m, gen_cfg)
  for path, a in zip(_IMAGES.value, answers):
    print(f"{path}\t{a}" if len(answers) > 1 else a)


if __name__ == "__main__":
  cli.run(main)
