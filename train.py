r"""Train (and evaluate) MQT-LLaVA.

  python train.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny
  python train.py --config=configs/mqt_llava.py:stage=2 --workdir=/ckpt/stage2 \
      --config.tokenizer_path=/ckpt/vicuna/tokenizer.model

Re-running with the same --workdir resumes from the last checkpoint.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from mqt import cli
from mqt import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, summary.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
