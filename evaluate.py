r"""Evaluate a trained MQT-LLaVA at several m: accuracy, FLOPs, latency, plots.

  python evaluate.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --ms=1,2,4,8,16
  python evaluate.py --config=configs/mqt_llava.py --workdir=/ckpt --checkpoint=hf \
      --config.init.mqt_llava=/ckpt/mqt-llava-7b --ms=2,4,8,16,36,64,144,256 \
      --benchmarks=pope,gqa --config.eval.benchmarks.pope.folder=/data/pope \
      --config.eval.benchmarks.pope.image_folder=/data/coco/val2014 ...

Every problem of the command line, the config (mqt/validate.py), its files and
checkpoints is named at once, as `error: ...` lines, before any work starts (exit
status 2; --debug shows the traceback).

Use the same --config (and overrides) the model was trained with. The memory a
run at the largest m needs is printed before any weight is read, and a run that
cannot fit stops there; --dry_run prints it and stops (no data or weights read). Writes
results.json / results.csv / predictions / accuracy_vs_m.png /
accuracy_vs_flops.png under --out_dir (default <workdir>/eval).

--flops_budget or --latency_budget_ms (instead of --ms) evaluates the one m a budget
per image buys (mqt/budget.py), chosen once the benchmarks' prompt length is known and
printed before any weight is read.

The built-in benchmark files (the synthetic held-out splits in the published formats)
are prepared once (`run_inputs.prepare_builtin_benchmarks`) before the sweep reads
them; the synthetic set's chance baseline comes from its generator's answer sets.
"""
from absl import flags

from mqt import budget
from mqt import cli
from mqt import evaluate
from mqt import inference
from mqt import paths
from mqt import run_inputs
from mqt import validate
from mqt.benchmarks import registry

_CONFIG, _WORKDIR, _CHECKPOINT = cli.define_model_flags()
_MS = flags.DEFINE_list("ms", None, "Visual token counts to evaluate, e.g. 1,2,4,8,16 "
                        "(default: config.eval.ms). Each must satisfy 1 <= m <= M. Not with "
                        "--flops_budget / --latency_budget_ms.")
_BENCHMARKS = flags.DEFINE_list(
    "benchmarks", ["builtin"],
    f"builtin ({', '.join(registry.builtin_names())} on the built-in data) and/or "
    f"{', '.join(n for n, b in registry.REGISTRY.items() if b.from_config)} with paths in "
    f"config.eval.benchmarks.")
_FLOPS_BUDGET = flags.DEFINE_float(
    "flops_budget", None, "Instead of --ms: evaluate the largest m whose analytic FLOPs per "
    "image (prompt pass plus config.eval.generation.max_new_tokens decoded tokens) fit. The "
    "prompt length is the sweep's: the longest prompt of the loaded questions, rounded up to "
    "a multiple of 8 (with --dry_run, the longest the config's sequence length allows).")
_LATENCY_BUDGET = flags.DEFINE_float(
    "latency_budget_ms", None, "Instead of --ms: evaluate the largest m whose latency per "
    "image, measured at batch 1 on this machine by latency.py, fits (the sweep itself runs "
    "batches of config.eval.generation.batch_size).")
_LATENCY_TABLE = flags.DEFINE_string(
    "latency_table", "", "The latency table --latency_budget_ms reads (default: latency.json "
    "beside the checkpoint; <workdir>/latency_hf.json for --checkpoint=hf).")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where results go (default <workdir>/eval).")
_LIMIT = flags.DEFINE_integer("limit", 0, "At most this many questions per benchmark (0: all).")
flags.mark_flags_as_required(["config", "workdir"])


def command_line_problems(config, found: cli.Problems) -> list[int]:
  """--ms (integers, each 1 <= m <= M; M known later for --checkpoint=hf) or a budget
  instead, --limit and --benchmarks; problems go to `found`. -> the m values to evaluate
  ([] with a budget: the sweep chooses its m)."""
  hf = _CHECKPOINT.value == "hf"
  budgets = [f"--{f.name}={f.value:g}" for f in (_FLOPS_BUDGET, _LATENCY_BUDGET)
             if f.value is not None]
  found.add(budget.flag_problems(_FLOPS_BUDGET.value, _LATENCY_BUDGET.value,
                                 _LATENCY_TABLE.value))
  if budgets:
    ms, field = [], ""
    if len(budgets) > 1 or _MS.value:
      given = ([f"--ms={','.join(_MS.value)}"] if _MS.value else []) + budgets
      found.add(f"give at most one of --ms, --flops_budget, --latency_budget_ms (got "
                f"{' and '.join(given)})")
  elif _MS.value:
    ms, bad = cli.int_list("ms", _MS.value)
    found.add(bad)
    field = f"--ms={','.join(_MS.value)}"
  else:
    ms, field = [int(m) for m in config.eval.ms], ""
    if not ms:
      found.add("no m to evaluate: pass --ms=1,2,4,... or set --config.eval.ms")
  if field and not budgets:
    found.add(validate.ms_problems(field, ms, None if hf else validate.num_queries(config)))
  if _LIMIT.value < 0:
    found.add(f"--limit={_LIMIT.value} must be >= 0 (0: every question)")
  try:
    evaluate.expand_names(_BENCHMARKS.value)
  except ValueError as e:
    found.add(f"--benchmarks={','.join(_BENCHMARKS.value)}: {e}")
  return ms


def preflight(config, workdir: str) -> list[int]:
  """Every problem of the command line, the config, the paths and the checkpoint, named
  together before any data, weight or compile (a UserError, exit status 2). -> ms."""
  found = cli.Problems()
  ms = command_line_problems(config, found)
  hf = _CHECKPOINT.value == "hf"
  budgeted = _FLOPS_BUDGET.value is not None or _LATENCY_BUDGET.value is not None
  skip = (("eval.ms",) if _MS.value or hf or budgeted else ()) + (("stage",) if hf else ())
  inference.load_problems(found, config, workdir, _CHECKPOINT.value, skip)
  table = read_table(config, workdir, found)
  try:
    builtin = "builtin" in evaluate.benchmark_sources(_BENCHMARKS.value).values()
  except ValueError:  # An unknown name, already named.
    builtin = False
  if builtin and run_inputs.builtin_dir_problem(config, workdir):
    found.add(run_inputs.builtin_dir_problem(config, workdir))
  if paths.is_uri(out_dir(workdir)):
    found.add(f"results are written to local disk, not {out_dir(workdir)}: set --out_dir to a "
              f"local folder")
  found.raise_if_any()
  return ms, table


def read_table(config, workdir: str, found: cli.Problems):
  """The latency table of --latency_budget_ms (None without it, or with its problem in
  `found`)."""
  if _LATENCY_BUDGET.value is None:
    return None
  try:
    checkpoint, _ = run_inputs.resolve_paths(config, workdir, _CHECKPOINT.value)
  except ValueError:
    return None  # Named by inference.load_problems.
  path = _LATENCY_TABLE.value or budget.table_path(checkpoint, workdir)
  table = found.check(budget.LatencyTable.load, path)
  new = int(config.eval.generation.max_new_tokens)
  if table is not None and table.max_new_tokens < new:
    found.add(f"latency table {path} was measured decoding {table.max_new_tokens} tokens, but "
              f"config.eval.generation.max_new_tokens is {new}: measure one with `python "
              f"latency.py --max_new_tokens={new}`")
  return table


def budget_picker(table):
  """The sweep's pick_m for --flops_budget / --latency_budget_ms (None without one); an
  unmet budget is a usage error naming it."""
  if _FLOPS_BUDGET.value is None and _LATENCY_BUDGET.value is None:
    return None
  def pick(model_cfg, text_len, max_new_tokens):
    try:
      return budget.choose_m(model_cfg, text_len, max_new_tokens,
                             flops_budget=_FLOPS_BUDGET.value,
                             latency_budget_ms=_LATENCY_BUDGET.value, table=table)
    except budget.BudgetError as e:
      raise cli.UserError(str(e)) from None
  return pick


def out_dir(workdir: str) -> str:
  return _OUT_DIR.value or paths.join(workdir, "eval")


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  ms, table = preflight(config, _WORKDIR.value)
  sources = evaluate.benchmark_sources(_BENCHMARKS.value)
  if "builtin" in sources.values() and not cli.DRY_RUN.value:
    run_inputs.prepare_builtin_benchmarks(config, _WORKDIR.value)
  evaluate.sweep(config, _WORKDIR.value, ms, _BENCHMARKS.value, out_dir(_WORKDIR.value),
                 checkpoint=_CHECKPOINT.value, limit=_LIMIT.value, dry_run=cli.DRY_RUN.value,
                 chance={"synthetic": run_inputs.synthetic_chance},
                 pick_m=budget_picker(table))


if __name__ == "__main__":
  cli.run(main)
