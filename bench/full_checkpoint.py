r"""A full-size MQT-LLaVA checkpoint in the released layout, random weights, written
without holding the model in memory.

  python -m bench.full_checkpoint --out=/tmp/mqt7b                 # 7B, vision tower in
  python -m bench.full_checkpoint --out=/tmp/mqt7b_novis --nowith_vision
  python -m bench.full_checkpoint --out=/tmp/mqt_tiny --tiny       # configs/tiny.py's shapes

Writes what a release holds: `model-0000k-of-0000n.safetensors` shards and
`model.safetensors.index.json`, a `config.json` (HF LlamaConfig fields plus
LLaVA's mm_* fields, `convert.released_config`), and tokenizer files (a small
SentencePiece `tokenizer.model` trained on the built-in corpus, so <= 32000
pieces, with `tokenizer_config.json` and `special_tokens_map.json`). Every
tensor has its released name and shape (`convert.checkpoint_layout`: the rule
tables on the abstract shapes of `configs/mqt_llava.py`: 7,050,846,208
parameters with the vision tower under `model.vision_tower.vision_tower.vision_model.`).

Each shard's header is computed from the shapes first, then every tensor's
bytes are streamed in 8 MiB pieces: memory stays flat whatever the size. The
values are normal(0, 0.02) (LayerNorm / RMSNorm weights 1 + that), taken as
slices at random offsets of one pool of 2^24 normal draws, so the 14 GB are
written at disk speed; the same seed gives the same bytes. The last lines say whether
the machine was busy while it wrote (`bench.common.MachineWatch`).
"""
import json
import math
import os
import time
import zlib

import numpy as np
from absl import app
from absl import flags

from mqt.checkpoint_io import safetensors_header

_POOL = 1 << 24
_CHUNK = 1 << 22  # Elements per write.


def model_config(tiny: bool = False):
  """The 7B's ModelConfig (configs/mqt_llava.py), or configs/tiny.py's (official)."""
  from configs import mqt_llava, tiny as tiny_cfg  # pylint: disable=import-outside-toplevel
  from mqt.model import ModelConfig  # pylint: disable=import-outside-toplevel
  config = tiny_cfg.get_config("variant=official") if tiny else mqt_llava.get_config()
  return ModelConfig.from_config(config.model)


def _np_dtype(dtype: str):
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]


def _is_norm_weight(key: str, shape) -> bool:
  return len(shape) == 1 and key.endswith("weight") and (
      "norm" in key or "layrnorm" in key or ".ln_" in key)


class _Values:
  """Random tensors as slices of one pool of normal(0, 0.02) draws at random offsets."""

  def __init__(self, seed: int, dtype: str):
    rng = np.random.default_rng(seed)
    self.pool = (rng.standard_normal(_POOL + _CHUNK, dtype=np.float32) * 0.02).astype(
        _np_dtype(dtype))
    self.seed, self.dtype = seed, dtype

  def chunks(self, key: str, shape):
    """Yields the tensor's values, flat, in pieces of at most _CHUNK elements."""
    rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
    n = math.prod(shape)
    norm = _is_norm_weight(key, shape)
    for start in range(0, n, _CHUNK):
      k = min(_CHUNK, n - start)
      piece = self.pool[(o := int(rng.integers(0, _POOL))):o + k]
      yield (piece.astype(np.float32) + 1).astype(piece.dtype) if norm else piece


def _split(layout: dict, itemsize: int, shards: int) -> list[list[str]]:
  """Keys in order -> `shards` consecutive groups of about equal bytes."""
  total = sum(math.prod(s) for s in layout.values()) * itemsize
  groups, acc = [[]], 0
  for key, shape in layout.items():
    if acc >= total * len(groups) / shards and len(groups) < shards and groups[-1]:
      groups.append([])
    groups[-1].append(key)
    acc += math.prod(shape) * itemsize
  return groups


def _write_shard(path: str, keys, layout, values: _Values, dtype: str):
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(safetensors_header((key, _np_dtype(dtype), layout[key]) for key in keys))
    for key in keys:
      for piece in values.chunks(key, layout[key]):
        f.write(memoryview(np.ascontiguousarray(piece)).cast("B"))
  os.replace(tmp, path)


def write_tokenizer(out_dir: str, seed: int = 0) -> None:
  """tokenizer.model (a small LLaMA-like SentencePiece model trained on the built-in
  corpus), tokenizer_config.json and special_tokens_map.json as LLaVA releases them."""
  from data import synthetic  # pylint: disable=import-outside-toplevel
  from data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tokenizer_lib.train_tokenizer(synthetic.corpus_text(seed, 2000),
                                os.path.join(out_dir, "tokenizer.model"), vocab_size=1024)
  special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
  _dump(os.path.join(out_dir, "special_tokens_map.json"), special)
  _dump(os.path.join(out_dir, "tokenizer_config.json"), {
      **special, "add_bos_token": True, "add_eos_token": False, "legacy": False,
      "clean_up_tokenization_spaces": False, "model_max_length": 2048,
      "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"})


def _dump(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def write_full_checkpoint(out_dir: str, model_cfg=None, dtype: str = "float16", seed: int = 0,
                          shards: int = 3, with_vision: bool = True,
                          tokenizer: bool = True) -> dict:
  """Writes the released layout of `model_cfg` (default: the 7B) with random weights to
  `out_dir`; -> {"parameters", "bytes", "files", "seconds"}. Memory stays flat: one
  8 MiB piece of a tensor at a time."""
  from mqt import convert  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  model_cfg = model_cfg or model_config()
  layout = convert.checkpoint_layout(model_cfg, with_vision=with_vision)
  itemsize = np.dtype(_np_dtype(dtype)).itemsize
  os.makedirs(out_dir, exist_ok=True)
  values = _Values(seed, dtype)
  groups = _split(layout, itemsize, shards)
  weight_map, files = {}, []
  for k, keys in enumerate(groups):
    name = (f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1
            else "model.safetensors")
    _write_shard(os.path.join(out_dir, name), keys, layout, values, dtype)
    weight_map.update({key: name for key in keys})
    files.append(name)
  count = sum(math.prod(s) for s in layout.values())
  if len(groups) > 1:
    _dump(os.path.join(out_dir, "model.safetensors.index.json"),
          {"metadata": {"total_size": count * itemsize}, "weight_map": weight_map})
  _dump(os.path.join(out_dir, "config.json"), convert.released_config(model_cfg, dtype))
  if tokenizer:
    write_tokenizer(out_dir, seed)
  return {"parameters": count, "bytes": count * itemsize, "files": files,
          "seconds": time.perf_counter() - t0}


def _define_flags():
  """Flags exist only when this file runs as a program, so that tests may import it
  beside entry points that define --out or --seed themselves."""
  flags.DEFINE_string("out", "/tmp/mqt7b", "Output folder.")
  flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"],
                    "Stored tensor dtype (the release: float16).")
  flags.DEFINE_integer("shards", 3, "Safetensors shards (the release: 3).")
  flags.DEFINE_bool("with_vision", True, "Include the CLIP tower under "
                    "model.vision_tower.vision_tower.vision_model.")
  flags.DEFINE_bool("tiny", False, "configs/tiny.py's shapes (official variant) instead of "
                    "the 7B's.")
  flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
  from bench import common  # pylint: disable=import-outside-toplevel
  from mqt import cli  # pylint: disable=import-outside-toplevel
  cli.start(argv)
  watch = common.MachineWatch().start()
  f = flags.FLAGS
  info = write_full_checkpoint(f.out, model_config(f.tiny), f.dtype, f.seed, f.shards,
                               f.with_vision)
  print(f"{f.out}: {info['parameters']:,} parameters, {info['bytes'] / 1e9:.2f} GB in "
        f"{len(info['files'])} shard(s), {info['seconds']:.0f} s", flush=True)
  print(common.machine_lines(watch.stop()))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
