"""What every command-line entry point (train.py, evaluate.py, predict.py, export.py)
does first, and the flags they share (defined once here, so importing several entry
points in one process never defines a flag twice)."""
from absl import app
from absl import flags
from absl import logging

DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile ahead of time on abstract parameters (no data, weights or "
    "parameters are read or allocated), print the memory per device and stop.")
PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", None, ["float32", "bfloat16"],
    "Parameter dtype (default: config.model.param_dtype). bfloat16 halves the memory of "
    "imported weights; float32 is the exact path.")


def start(argv) -> None:
  """Rejects stray arguments; quiets library INFO logs unless --verbosity was given
  (progress lines are printed, not logged)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def apply_param_dtype(config):
  """--param_dtype, when given, overrides config.model.param_dtype (returns config)."""
  if PARAM_DTYPE.value is not None:
    with config.unlocked():
      config.model.param_dtype = PARAM_DTYPE.value
  return config


def user_settings() -> set[str]:
  """The config fields set on the command line (`--config.model.llm.depth=40` ->
  "model.llm.depth"); empty where no --config flag was parsed."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  holder = flags.FLAGS["config"] if "config" in flags.FLAGS else None
  if holder is None or not holder.present:
    return set()
  try:
    return set(config_flags.get_override_values(holder))
  except (TypeError, AttributeError):  # Not a config flag, or not parsed yet.
    return set()
