r"""Measure the latency of one generation per m on this machine, for latency budgets.

  python latency.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny
  python latency.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --ms=1,2,4,9 \
      --text_len=48 --max_new_tokens=16

Per m: one image and a prompt of --text_len tokens at batch 1, decoding exactly
--max_new_tokens tokens (the end-of-sequence token is never taken, so no run stops
early); the median of --repeats runs after a warm-up. The table is written as JSON
beside the checkpoint (<checkpoint>/latency.json; <workdir>/latency_hf.json for
--checkpoint=hf) unless --out names a file; predict.py --latency_budget_ms reads it
(mqt/budget.py). A table holds the device it was measured on, and is refused on
another.

Every problem of the command line, the config, its files and checkpoints is named at
once, as `error: ...` lines, before any weight is read (exit status 2). The memory of
the run at the largest m is printed first; --dry_run prints it and stops.
"""
from absl import flags

from mqt import budget
from mqt import cli
from mqt import config_lib
from mqt import flops as flops_lib
from mqt import inference
from mqt import run_inputs
from mqt import validate

DEFAULT_TEXT_LEN = 64

_CONFIG, _WORKDIR, _CHECKPOINT = cli.define_model_flags()
_MS = flags.DEFINE_list("ms", None, "Values of m to measure, e.g. 1,2,4,9 (default: the "
                        "powers of 2 up to M, 36, 64 and 144 where they fit, and M). Budgets "
                        "choose only from the measured range, interpolating inside it.")
_TEXT_LEN = flags.DEFINE_integer(
    "text_len", None, f"Prompt tokens of the timed generation (default: {DEFAULT_TEXT_LEN}, "
    "or the longest prompt the config's sequence length allows if shorter). Latency grows "
    "with the prompt: measure at the prompt length you serve.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens every timed generation "
                                "decodes (default: config.eval.generation.max_new_tokens, "
                                "which predict.py uses too).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per m after a warm-up; the table "
                                "keeps their median.")
_OUT = flags.DEFINE_string("out", "", "Where the table goes (default: latency.json beside "
                           "the checkpoint; <workdir>/latency_hf.json for --checkpoint=hf).")
flags.mark_flags_as_required(["config", "workdir"])


def _ms_flag(big_m: int | None) -> tuple[list[int], list[str]]:
  """--ms (or the default for M) -> (ms, problems); big_m None: M not known yet."""
  if not _MS.value:
    return ([m for m in flops_lib.default_ms(big_m) if m <= big_m] if big_m else []), []
  ms, problems = cli.int_list("ms", _MS.value)
  problems += validate.ms_problems(f"--ms={','.join(_MS.value)}", ms, big_m)
  return ms, problems


def command_line_problems(config) -> list[str]:
  """--ms (1 <= m <= M; M known later for --checkpoint=hf), --text_len, --max_new_tokens
  and --repeats."""
  big_m = None if _CHECKPOINT.value == "hf" else validate.num_queries(config)
  _, problems = _ms_flag(big_m)
  if _TEXT_LEN.value is not None and _TEXT_LEN.value < 1:
    problems.append(f"--text_len={_TEXT_LEN.value} must be >= 1")
  if _MAX_NEW.value is not None and _MAX_NEW.value < 1:
    problems.append(f"--max_new_tokens={_MAX_NEW.value} must be >= 1")
  if _REPEATS.value < 1:
    problems.append(f"--repeats={_REPEATS.value} must be >= 1")
  return problems


def preflight(config, workdir: str) -> None:
  """Every problem of the command line, the config, the paths and the checkpoint, named
  together before any weight or compile (a UserError, exit status 2)."""
  found = cli.Problems()
  found.add(command_line_problems(config))
  hf = _CHECKPOINT.value == "hf"
  inference.load_problems(found, config, workdir, _CHECKPOINT.value,
                          skip=("eval.ms",) + (("stage",) if hf else ()))
  if _OUT.value and not _OUT.value.endswith(".json"):
    found.add(f"--out={_OUT.value}: the table is JSON; name a .json file")
  found.raise_if_any()


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  dry_run = cli.DRY_RUN.value
  preflight(config, _WORKDIR.value)
  checkpoint, tok_path = run_inputs.resolve_paths(config, _WORKDIR.value, _CHECKPOINT.value)
  model_cfg = inference.model_config(config, checkpoint)
  ms, problems = _ms_flag(model_cfg.query.num_queries)
  max_text = config_lib.max_text_len(config, config.eval.data, "config.eval.data")
  text_len = _TEXT_LEN.value or min(DEFAULT_TEXT_LEN, max_text)
  max_new = _MAX_NEW.value or int(config.eval.generation.max_new_tokens)
  prompts, sampling = inference.encode_prompts(config, tok_path, [""], [budget.MEASURE_PROMPT],
                                               config.eval.generation)
  if len(prompts[0]) > text_len:
    problems.append(f"--text_len={text_len} is shorter than the {len(prompts[0])} tokens of "
                    f"the timed prompt ({budget.MEASURE_PROMPT!r} in the template)")
  if problems:
    raise cli.problems_error(problems, "this run cannot start")
  sampling = budget.timing_sampling(sampling.pad_id, max_new)
  out = _OUT.value or budget.table_path(checkpoint, _WORKDIR.value)
  inference.plan_memory(config, model_cfg, max(ms), 1, text_len, sampling, dry_run)
  if dry_run:
    return
  loaded = inference.load(config, _WORKDIR.value, _CHECKPOINT.value, model_cfg)
  print(f"measuring m = {', '.join(map(str, ms))} on {budget.device_name()}: batch 1, prompt "
        f"{text_len} tokens, {max_new} new tokens, median of {_REPEATS.value} after a warm-up",
        flush=True)
  table = budget.measure_latency(
      loaded, ms, text_len, max_new, _REPEATS.value,
      progress=lambda m, t: print(f"m={m:<4} {t:10.1f} ms", flush=True))
  table.save(out)
  print(f"latency table written to {out}", flush=True)


if __name__ == "__main__":
  cli.run(main)
