r"""Evaluate a trained MQT-LLaVA at several m: accuracy, FLOPs, latency, plots.

  python evaluate.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --ms=1,2,4,8,16
  python evaluate.py --config=configs/mqt_llava.py --workdir=/ckpt --checkpoint=hf \
      --config.init.mqt_llava=/ckpt/mqt-llava-7b --ms=2,4,8,16,36,64,144,256 \
      --benchmarks=pope,gqa --config.eval.benchmarks.pope.folder=/data/pope \
      --config.eval.benchmarks.pope.image_folder=/data/coco/val2014 ...

Use the same --config (and overrides) the model was trained with. The memory a
run at the largest m needs is printed before any weight is read, and a run that
cannot fit stops there; --dry_run prints it and stops (no data or weights read). Writes
results.json / results.csv / predictions / accuracy_vs_m.png /
accuracy_vs_flops.png under --out_dir (default <workdir>/eval).
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from mqt import cli
from mqt import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir (checkpoints, data).")
_MS = flags.DEFINE_list("ms", None, "Visual token counts to evaluate, e.g. 1,2,4,8,16 "
                        "(default: config.eval.ms). Each must satisfy 1 <= m <= M.")
_BENCHMARKS = flags.DEFINE_list("benchmarks", ["builtin"],
                                "builtin (synthetic, pope, scienceqa, vqav2, gqa on the built-in "
                                "data) and/or pope, scienceqa, mme, gqa, vqav2, textvqa, vizwiz, "
                                "mmbench with paths in config.eval.benchmarks.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "An orbax checkpoints folder, or 'hf' to "
                                  "import config.init's HF weights (default: the last stage "
                                  "of --workdir).")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where results go (default <workdir>/eval).")
_LIMIT = flags.DEFINE_integer("limit", 0, "At most this many questions per benchmark (0: all).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  ms = [int(m) for m in (_MS.value or config.eval.ms)]
  out_dir = _OUT_DIR.value or os.path.join(_WORKDIR.value, "eval")
  evaluate.sweep(config, _WORKDIR.value, ms, _BENCHMARKS.value, out_dir,
                 checkpoint=_CHECKPOINT.value, limit=_LIMIT.value, dry_run=cli.DRY_RUN.value)


if __name__ == "__main__":
  app.run(main)
