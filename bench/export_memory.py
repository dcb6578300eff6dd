r"""Host memory of export.py on a full-size checkpoint, and the export checked against it.

  python -m bench.full_checkpoint --out=/tmp/mqt7b          # once: the released layout
  python -m bench.export_memory --ckpt=/tmp/mqt7b --out=/tmp/mqt7b_export

Runs `export.py --checkpoint=hf` (import, then export, both streaming) under GNU
`time -v` with configs/mqt_llava.py, then streams the source and the export tensor
by tensor (`mqt.export.compare`): the same keys and shapes, and every value within
the rounding of --param_dtype of the source value (bfloat16: |a - b| <= 2**-8 |a|;
float32: equal). Prints the command, its wall time and maximum resident set size,
and the comparison; exits non-zero when they do not match. The last lines say whether
the machine was busy while it ran (`bench.common.MachineWatch`).
"""
import os
import re
import subprocess
import sys
import time

from absl import app
from absl import flags

from bench import common
from mqt import export

_CKPT = flags.DEFINE_string("ckpt", "/tmp/mqt7b", "A checkpoint in the released layout.")
_OUT = flags.DEFINE_string("out", "/tmp/mqt7b_export", "Where the export goes (replaced).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "--param_dtype.")
_CONFIG = flags.DEFINE_string("config_file", "configs/mqt_llava.py", "export.py's --config.")
_COMPARE_ONLY = flags.DEFINE_bool("compare_only", False, "Only compare an earlier export.")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOL = {"bfloat16": 2.0**-8, "float32": 0.0}


def _time_v(stderr: str, label: str) -> str:
  m = re.search(rf"{re.escape(label)}: (.*)", stderr)
  return m.group(1).strip() if m else "?"


def main(argv):
  del argv
  watch = common.MachineWatch().start()
  if not _COMPARE_ONLY.value:
    _export()
  t0 = time.perf_counter()
  result = export.compare(_CKPT.value, _OUT.value, _TOL[_DTYPE.value], cast=_DTYPE.value)
  print(f"compare ({time.perf_counter() - t0:.0f} s): {result['tensors']} tensors, "
        f"{result['elements']:,} values, max |a - b| / |a| = {result['max_rel']:.3g} "
        f"(tolerance {_TOL[_DTYPE.value]:.3g}), {result['cast_equal']} tensors bitwise the "
        f"source cast once to {_DTYPE.value}, {len(result['problems'])} problem(s)")
  for p in result["problems"][:20]:
    print("  " + p)
  print(common.machine_lines(watch.stop()))
  if result["problems"]:
    sys.exit(1)


def _export():
  cmd = ["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "export.py"),
         f"--config={_CONFIG.value}", "--workdir=/tmp/exp7b", "--checkpoint=hf",
         f"--config.init.mqt_llava={_CKPT.value}", f"--param_dtype={_DTYPE.value}",
         f"--out={_OUT.value}", "--overwrite"]
  print(" ".join(cmd[2:]), flush=True)
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  print(proc.stdout, end="")
  if proc.returncode:
    print(proc.stderr[-3000:])
    sys.exit(f"export.py failed (exit {proc.returncode})")
  rss_kb = int(_time_v(proc.stderr, "Maximum resident set size (kbytes)"))
  print(f"export.py: wall {_time_v(proc.stderr, 'Elapsed (wall clock) time (h:mm:ss or m:ss)')}"
        f", max RSS {rss_kb} kB = {rss_kb / 2**20:.2f} GiB", flush=True)


if __name__ == "__main__":
  app.run(main)
