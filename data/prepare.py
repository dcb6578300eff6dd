r"""Prepare datasets as TFDS ArrayRecord folders (no TensorFlow needed).

  # The built-in synthetic set (+ its tokenizer), as train.py does on first use:
  python -m data.prepare --kind=synthetic --data_dir=/data/mqt
  # A LLaVA conversation JSON and its image folder (e.g. LCS-558K, the 665K mix):
  python -m data.prepare --kind=llava --data_dir=/data/mqt --name=llava665k \
      --json=/data/llava_v1_5_mix665k.json --image_folder=/data/images --on_error=skip

It prints the folder to pass as `--config.stage2.data.dataset_dir` (kind tfds).
Records are judged as training judges them (data/records.py): with --on_error=skip
the unusable ones are left out, one line per reason is printed with its count, and
all of them are listed in the dataset metadata. An existing dataset of the same
--name is refused; --overwrite prepares it again.
"""
import contextlib
import fcntl
import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging

from data import tfds_builders
from data.sources import DataError

SYNTHETIC = "mqt_synthetic"
BUILTIN_VOCAB = 1024  # Halves sequence lengths against 512 (the system prompt is long).


def builtin_root(data_dir: str) -> str:
  return tfds_builders.dataset_dir(data_dir, SYNTHETIC)


def builtin_tokenizer_path(data_dir: str) -> str:
  return os.path.join(data_dir, SYNTHETIC + "_tokenizer", "tokenizer.model")


def check_settings(stamp: str, wanted: dict, root: str, what: str) -> None:
  """`root` was prepared with the settings recorded in the JSON file `stamp`: they must
  be `wanted`, else a DataError (reusing it would silently mix two datasets)."""
  with open(stamp) as f:
    have = json.load(f)
  if have != wanted:
    raise DataError(f"{root} holds {what} prepared with {have}, but {wanted} is asked for; "
                    f"use another data_dir or delete it")


@contextlib.contextmanager
def _locked(data_dir: str):
  """An exclusive file lock in data_dir (created if needed), held for the block."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    yield


def ensure_builtin(data_dir: str, seed: int = 0, image_size: int = 64, sizes=None) -> str:
  """Prepares the built-in synthetic set (and tokenizer) unless already there.

  Holds an exclusive file lock in data_dir while it looks and prepares, so
  concurrent callers (processes sharing a host's disk, two runs or this CLI
  beside a run on one data_dir) take turns: two preparations of one data_dir
  at once race on tfds' final rename."""
  with _locked(data_dir):
    return _ensure_builtin(data_dir, seed, image_size, sizes)


def write_json_atomic(path: str, value) -> None:
  """Writes `value` as JSON to `path` via a temporary file and os.replace, so a reader
  never sees a half-written file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f)
  os.replace(tmp, path)


def ensure_builtin_tokenizer(data_dir: str, seed: int = 0) -> str:
  """Trains the built-in set's tokenizer into data_dir unless it is there; -> its path."""
  from data import synthetic  # pylint: disable=import-outside-toplevel
  from data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tok_path = builtin_tokenizer_path(data_dir)
  if not os.path.exists(tok_path):
    print(f"training the built-in tokenizer -> {tok_path}", flush=True)
    os.makedirs(os.path.dirname(tok_path), exist_ok=True)
    tokenizer_lib.train_tokenizer(synthetic.corpus_text(seed, 4000), tok_path,
                                  vocab_size=BUILTIN_VOCAB)
  return tok_path


def _ensure_builtin(data_dir: str, seed: int, image_size: int, sizes) -> str:
  from data import synthetic  # pylint: disable=import-outside-toplevel
  sizes = dict(sizes or {"captions": 4000, "instruct": 12000, "eval": 600})
  root = builtin_root(data_dir)
  wanted = {"seed": seed, "image_size": image_size, "sizes": sizes,
            "version": synthetic.DATA_VERSION}
  stamp = os.path.join(data_dir, SYNTHETIC + "_settings.json")
  if os.path.exists(os.path.join(root, "dataset_info.json")):
    check_settings(stamp, wanted, root, "the built-in set")
    return root
  os.makedirs(data_dir, exist_ok=True)
  ensure_builtin_tokenizer(data_dir, seed)
  print(f"preparing the built-in synthetic dataset {sizes} -> {root}", flush=True)
  builder = tfds_builders.MqtSynthetic(seed=seed, image_size=image_size, sizes=sizes,
                                       data_dir=data_dir)
  builder.download_and_prepare()
  write_json_atomic(stamp, wanted)
  return root


def prepare_llava(json_path: str, image_folder: str, name: str, data_dir: str,
                  on_error: str = "fail", overwrite: bool = False) -> str:
  """Prepares a LLaVA JSON + image folder as dataset `name` in data_dir; -> its folder.

  Raises:
    DataError: the first unusable record (on_error="fail"), or a dataset `name` that
      already exists in data_dir and `overwrite` is false.
  """
  out = tfds_builders.dataset_dir(data_dir, "llava_conversations", name)
  with _locked(data_dir):
    if os.path.exists(out):
      if not overwrite:
        raise DataError(f"{out}: a dataset named {name!r} is already prepared here; choose "
                        f"another --name, or pass --overwrite to prepare it again")
      print(f"removing the existing dataset {out} (--overwrite)", flush=True)
      shutil.rmtree(out)
    builder = tfds_builders.LlavaConversations(
        json_path=json_path, image_folder=image_folder, on_error=on_error, data_dir=data_dir,
        config=tfds_builders.tfds.core.BuilderConfig(name=name))
    builder.download_and_prepare()
  skipped = (builder.info.metadata or {}).get("skipped", {}).get("train", [])
  if skipped:
    logging.warning("%d records were skipped (listed in the dataset metadata)", len(skipped))
    print(f"{len(skipped)} records skipped (listed in the dataset metadata)", flush=True)
  return out


def _define_flags():
  """The command's flags, defined only when run as a program (importing this module
  from train.py or export.py must not define --json, --overwrite, ...)."""
  flags.DEFINE_enum("kind", "synthetic", ["synthetic", "llava"], "What to prepare.")
  flags.DEFINE_string("data_dir", None, "Where TFDS folders are written.")
  flags.DEFINE_string("json", None, "llava: the conversation JSON.")
  flags.DEFINE_string("image_folder", None, "llava: the image folder.")
  flags.DEFINE_string("name", "custom", "llava: a name for this dataset.")
  flags.DEFINE_enum("on_error", "fail", ["fail", "skip"],
                    "llava: an unusable record (bad structure, missing or corrupt image) "
                    "fails, or is skipped and counted.")
  flags.DEFINE_bool("overwrite", False,
                    "llava: prepare again a dataset --name that already exists.")
  flags.DEFINE_integer("seed", 0, "synthetic: seed.")
  flags.DEFINE_integer("image_size", 64, "synthetic: image size.")


def main(argv):
  del argv
  args = flags.FLAGS
  if not args.data_dir:
    raise app.UsageError("--data_dir is required")
  if args.kind == "synthetic":
    out = ensure_builtin(args.data_dir, seed=args.seed, image_size=args.image_size)
  else:
    if not args.json:
      raise app.UsageError("--json is required for --kind=llava")
    try:
      out = prepare_llava(args.json, args.image_folder or "", args.name, args.data_dir,
                          args.on_error, overwrite=args.overwrite)
    except DataError as e:
      sys.exit(f"data.prepare: {e}")
  print(f"prepared: {out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
