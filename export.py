r"""Export trained MQT-LLaVA parameters to the released HF layout.

  python export.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --out=/tmp/mqt_tiny_hf
  python export.py --config=configs/mqt_llava.py --workdir=/tmp/w --checkpoint=hf \
      --config.init.mqt_llava=/ckpt/mqt-llava-7b --param_dtype=bfloat16 --out=/ckpt/re

Writes safetensors shards with model.safetensors.index.json, config.json and the
tokenizer files (mqt/export.py describes the layout). Use the --config (and
overrides) the model was trained with. --dry_run checks the paths and shapes,
prints what would be written and the host memory it needs, and stops.
"""
import sys

from absl import flags
from ml_collections import config_flags

from mqt import cli
from mqt import export
from mqt import convert
from mqt.checkpoint_io import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_OUT = flags.DEFINE_string("out", None, "The folder to write (must be new or empty).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "An orbax checkpoints folder, or 'hf' to "
                                  "re-export config.init.mqt_llava (default: the last stage "
                                  "of --workdir).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --out.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest shard file, e.g. 5GB, "
                                      "500MiB (a larger tensor gets a shard alone).")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  try:
    export.run(config, _WORKDIR.value, _OUT.value, _CHECKPOINT.value, cli.PARAM_DTYPE.value,
               export.parse_size(_MAX_SHARD_SIZE.value), _OVERWRITE.value,
               dry_run=cli.DRY_RUN.value)
  except (export.ExportError, CheckpointError, convert.HostMemoryError) as e:
    sys.exit(f"export.py: {e}")


if __name__ == "__main__":
  cli.run(main)
