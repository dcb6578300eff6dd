r"""Train (and evaluate) MQT-LLaVA.

  python train.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny
  python train.py --config=configs/mqt_llava.py:stage=2 --workdir=/ckpt/stage2 \
      --config.tokenizer_path=/ckpt/vicuna/tokenizer.model

Every problem of the command line, the config (mqt/validate.py), its files and
checkpoints is named at once, as `error: ...` lines, before any work starts (exit
status 2; --debug shows the traceback).

Re-running with the same --workdir resumes from the last checkpoint. Every stage's
step is compiled first and its memory per device printed; a step that does not fit
(config.device_memory_gib, else the device's own limit) stops the run before any
parameter is allocated. --dry_run stops there on abstract shapes (no data, weights or
tokenizer needed) and writes <workdir>/dry_run.json:

  XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py \
      --config=configs/mqt_llava.py:stage=2 --workdir=/tmp/dry --dry_run
"""

from absl import flags
from ml_collections import config_flags

from mqt import cli
from mqt import config_lib
from mqt import paths
from mqt import train
from mqt import validate
from mqt import params as params_lib
from mqt import run_inputs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, summary.json.")
flags.mark_flags_as_required(["config", "workdir"])


def _data_blocks(config) -> list:
  """(config path, block) of the data this run reads: its stages', and the eval's when
  config.eval.ms asks for an evaluation."""
  return [(where, block) for where, block in config_lib.data_blocks(config)
          if where != "eval.data" or config.eval.ms]


def checkpoint_problems(config, workdir: str) -> list[str]:
  """Each checkpoint this run would read (a stage's own, to resume; the first stage's
  init_from) against the config's model, from the checkpoints' metadata."""
  stages = run_inputs.stages_to_run(config)
  folders = [paths.join(workdir, f"stage{n}", "checkpoints") for n in stages]
  if stages and config[f"stage{stages[0]}"].init_from:
    folders.append(config[f"stage{stages[0]}"].init_from)
  folders = [f for f in folders if paths.isdir(f)]
  if not folders:
    return []
  model_cfg = params_lib.model_config(config)
  dtypes = cli.PARAM_DTYPE.value is None  # A restore casts to an asked-for dtype.
  return [p for f in folders for p in validate.model_checkpoint_problems(f, model_cfg,
                                                                         dtypes=dtypes)]


def preflight(config, workdir: str, dry_run: bool) -> None:
  """Every problem of the config, its files and checkpoints, named together before any
  data is prepared or any step compiled (a UserError, exit status 2)."""
  found = cli.Problems()
  found.check(config_lib.infer_data_kinds, config, cli.user_settings())
  config_found = validate.config_problems(config)
  found.add(config_found)
  if not dry_run:  # A dry run reads no data, weights or tokenizer.
    found.check(run_inputs.check_paths, config)
    found.add(validate.data_file_problems(_data_blocks(config)))
    if not config_found:
      found.check(lambda: found.add(checkpoint_problems(config, workdir)))
  found.raise_if_any()


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  preflight(config, _WORKDIR.value, cli.DRY_RUN.value)
  train.train_and_evaluate(config, _WORKDIR.value, dry_run=cli.DRY_RUN.value)


if __name__ == "__main__":
  cli.run(main)
