"""What every command-line entry point (train.py, evaluate.py, predict.py) does first."""
from absl import app
from absl import flags
from absl import logging


def start(argv) -> None:
  """Rejects stray arguments; quiets library INFO logs unless --verbosity was given
  (progress lines are printed, not logged)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
