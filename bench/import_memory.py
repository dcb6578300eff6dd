r"""Host memory of importing a full-size checkpoint (streaming), on this machine's CPU.

  python -m bench.full_checkpoint --out=/tmp/mqt7b          # once: the released layout
  /usr/bin/time -v python -m bench.import_memory --ckpt=/tmp/mqt7b --param_dtype=bfloat16
  python -m bench.import_memory --ckpt=/tmp/mqt7b --param_dtype=float32   # refuses first

The import is what every command does with `config.init.kind=hf`
(`configs/mqt_llava.py`): the architecture from the checkpoint
(`convert.model_config_for_checkpoint`), parameters created with the config's
mesh shardings (`convert.import_mqt_llava(..., param_dtype, shardings)`).
Prints the wall time, the tree's bytes and the process's peak resident memory
(VmHWM, what `time -v` reports as its maximum resident set size), then
compares one tensor against the file (within the rounding of param_dtype).
When the tree cannot fit (float32 here), the import refuses before reading any
weight: the line printed says what it needs, and the bytes the process had read
(/proc/self/io rchar) show that no weight was. The last lines say whether the machine
was busy while it ran (`bench.common.MachineWatch`).
"""
import time

import jax
import numpy as np
from absl import app
from absl import flags
from flax import linen as nn

from bench import common
from configs import mqt_llava
from mqt import cli
from mqt import convert
from mqt import sharding as shard_lib
from mqt.checkpoint_io import TensorSource
from mqt.model import abstract_params


def _status(field: str) -> int:
  """A VmHWM / VmRSS line of /proc/self/status, in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _read_bytes() -> int:
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def run(ckpt: str) -> dict:
  config = cli.apply_param_dtype(mqt_llava.get_config())
  config.init.mqt_llava = ckpt
  t0 = time.perf_counter()
  model_cfg = convert.model_config_for_checkpoint(config)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  rules = tuple(config.sharding.logical_axis_rules)
  dtype = config.model.param_dtype
  read0 = _read_bytes()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = shard_lib.param_shardings(abstract_params(model_cfg)["params"], mesh, rules)
    try:
      params = convert.import_mqt_llava(ckpt, model_cfg, param_dtype=dtype, shardings=shardings)
    except convert.HostMemoryError as e:
      print(f"refused after {time.perf_counter() - t0:.1f} s, having read "
            f"{(_read_bytes() - read0) / 2**20:.1f} MiB: {e}", flush=True)
      return {"refused": str(e)}
  jax.block_until_ready(params)
  wall = time.perf_counter() - t0
  tree = sum(x.nbytes for x in jax.tree.leaves(params))
  key = f"model.layers.{model_cfg.llm.depth - 1}.mlp.down_proj.weight"
  want = TensorSource(ckpt).get(key).astype(np.float32).T
  got = np.asarray(params["llm"]["layers"]["down_proj"]["kernel"][-1]).astype(np.float32)
  err = float(np.abs(got - want).max() / np.abs(want).max())
  out = {"param_dtype": dtype, "wall_s": wall, "tree_bytes": tree,
         "peak_rss_bytes": _status("VmHWM"), "max_rel_err_" + key: err,
         "devices": f"{jax.device_count()} {jax.devices()[0].platform}"}
  print(f"imported {ckpt} in {dtype}: {wall:.0f} s, tree {tree / 2**30:.2f} GiB, peak resident "
        f"{out['peak_rss_bytes'] / 2**30:.2f} GiB (VmHWM), {out['devices']} device(s); "
        f"{key} within {err:.1e} of the file (relative to its max)", flush=True)
  return out


def main(argv):
  cli.start(argv)
  watch = common.MachineWatch().start()
  run(flags.FLAGS.ckpt)
  print(common.machine_lines(watch.stop()))


if __name__ == "__main__":
  flags.DEFINE_string("ckpt", "/tmp/mqt7b", "A released-layout checkpoint folder.")
  app.run(main)
