r"""Train (and evaluate) MQT-LLaVA.

  python train.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny
  python train.py --config=configs/mqt_llava.py:stage=2 --workdir=/ckpt/stage2 \
      --config.tokenizer_path=/ckpt/vicuna/tokenizer.model

Re-running with the same --workdir resumes from the last checkpoint. Every stage's
step is compiled first and its memory per device printed; a step that does not fit
(config.device_memory_gib, else the device's own limit) stops the run before any
parameter is allocated. --dry_run stops there on abstract shapes (no data, weights or
tokenizer needed) and writes <workdir>/dry_run.json:

  XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py \
      --config=configs/mqt_llava.py:stage=2 --workdir=/tmp/dry --dry_run
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
  config = cli.apply_param_dtype(_CONFIG.value)
  train.train_and_evaluate(config, _WORKDIR.value, dry_run=cli.DRY_RUN.value)


if __name__ == "__main__":
  app.run(main)
