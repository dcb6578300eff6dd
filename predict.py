r"""Answer a question about images with a trained MQT-LLaVA at a chosen m.

  python predict.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --m=4 \
      --image=photo.png --prompt="What color is the circle?"

Every problem of the command line, the config (mqt/validate.py), its files and
checkpoints is named at once, as `error: ...` lines, before any work starts (exit
status 2; --debug shows the traceback).

--m is required (1 <= m <= M): there is no silent default. Several --image
flags answer the same prompt for each image in one batch. The memory the run
needs is printed before any weight is read; a run that cannot fit stops there.
--dry_run prints it and stops (no weights or images are read).
"""

from absl import flags

from mqt import cli
from mqt import inference
from mqt import matryoshka
from mqt import paths
from mqt import run_inputs
from mqt import validate

_CONFIG, _WORKDIR, _CHECKPOINT = cli.define_model_flags()
_IMAGES = flags.DEFINE_multi_string("image", None, "Image file(s).")
_PROMPT = flags.DEFINE_string("prompt", None, "The question.")
_M = flags.DEFINE_integer("m", None, "Visual tokens per image, 1 <= m <= M.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: config.eval.generation.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0: greedy. Default: config.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass. Default: config.")
flags.mark_flags_as_required(["config", "workdir", "image", "prompt", "m"])


def command_line_problems(config, dry_run: bool) -> list[str]:
  """--m (1 <= m <= M; M known later for --checkpoint=hf), the sampling flags, --prompt
  and the images (unless a dry run, which reads none)."""
  big_m = None if _CHECKPOINT.value == "hf" else validate.num_queries(config)
  m = _M.value
  problems = validate.ms_problems(f"--m={m}", [m], big_m)
  if _MAX_NEW.value is not None and _MAX_NEW.value < 1:
    problems.append(f"--max_new_tokens={_MAX_NEW.value} must be >= 1")
  if _TEMPERATURE.value is not None and _TEMPERATURE.value < 0:
    problems.append(f"--temperature={_TEMPERATURE.value} must be >= 0 (0: greedy)")
  if _TOP_P.value is not None and not 0 < _TOP_P.value <= 1:
    problems.append(f"--top_p={_TOP_P.value} must lie in (0, 1]")
  if not _PROMPT.value.strip():
    problems.append("--prompt is empty: ask a question")
  if not dry_run:
    problems += [f"image {p} does not exist" for p in _IMAGES.value if not paths.isfile(p)]
  return problems


def preflight(config, workdir: str, dry_run: bool) -> None:
  """Every problem of the command line, the config, the paths and the checkpoint, named
  together before any weight, image or compile (a UserError, exit status 2)."""
  found = cli.Problems()
  found.add(command_line_problems(config, dry_run))
  hf = _CHECKPOINT.value == "hf"
  inference.load_problems(found, config, workdir, _CHECKPOINT.value,
                          skip=("eval.ms",) + (("stage",) if hf else ()))
  found.raise_if_any()


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  dry_run = cli.DRY_RUN.value
  preflight(config, _WORKDIR.value, dry_run)
  gen_cfg = config.eval.generation.copy_and_resolve_references()
  with gen_cfg.unlocked():
    for key, flag in (("max_new_tokens", _MAX_NEW), ("temperature", _TEMPERATURE),
                      ("top_p", _TOP_P)):
      if flag.value is not None:
        gen_cfg[key] = flag.value
  if not dry_run:
    inference.check_images(_IMAGES.value)
  checkpoint, tok_path = run_inputs.resolve_paths(config, _WORKDIR.value, _CHECKPOINT.value)
  model_cfg = inference.model_config(config, checkpoint)
  m = matryoshka.validate_m(_M.value, model_cfg.query.num_queries)
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
