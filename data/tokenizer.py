"""SentencePiece tokenizer with the semantics of HF's slow `LlamaTokenizer`.

LLaMA conventions: <unk> = 0, <s> = 1, </s> = 2, pad = unk, byte fallback (a
character outside the vocabulary becomes its UTF-8 bytes, "\\n" = <0x0A>).

The texts of the special tokens (`<s>`, `</s>`, `<unk>`) inside a string become
their ids, as HF splits them out before SentencePiece sees the text. The text
is then encoded segment by segment: the first segment gets SentencePiece's
dummy-prefix "▁", a segment after a special token gets it only when `legacy`
is true. That is `LlamaTokenizer(legacy=...)` in transformers 4.x, which the
official LLaVA code uses (`use_fast=False`); `legacy` is read from the
`tokenizer_config.json` next to the model and defaults to true, as in HF (a
default that is logged once per model file; `Tokenizer.legacy_source` says
where the flag came from).

As a command, trains a tokenizer on the texts of LLaVA conversation files:

  python -m data.tokenizer --json=train.json[,more.json] --out=DIR/tokenizer.model \\
      --vocab_size=1024 [--legacy] [--overwrite]

It writes the model and a `tokenizer_config.json` beside it that records
`legacy` (false unless --legacy), so that this module, the training templates
and HF's `LlamaTokenizer` all read the same flag.
"""
import io
import json
import logging
import re
import sys

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data import paths
from data import records as records_lib
from data import sources

log = logging.getLogger(__name__)

CONFIG_NAME = "tokenizer_config.json"
LEGACY_SOURCES = ("tokenizer_config.json", "argument", "default")
# <unk>, <s>, </s> and the 256 byte-fallback pieces <0x00>..<0xFF>.
NUM_FIXED_PIECES = 3 + 256
_warned_default = set()  # Model paths whose default legacy flag was already logged.


class Tokenizer:
  """A LLaMA SentencePiece model (bytes of a `tokenizer.model`)."""

  def __init__(self, model_proto: bytes, legacy: bool = True, name: str = "<memory>",
               legacy_source: str = "argument"):
    if legacy_source not in LEGACY_SOURCES:
      raise ValueError(f"legacy_source={legacy_source!r}; one of {', '.join(LEGACY_SOURCES)}")
    self.name = name
    self.legacy = bool(legacy)
    self.legacy_source = legacy_source  # Where `legacy` came from (LEGACY_SOURCES).
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    self._sp_bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    specials = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id)
                if i >= 0}
    self._special_ids = specials
    alternatives = sorted(specials, key=len, reverse=True)
    self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

  @classmethod
  def load(cls, path: str, legacy: bool | None = None) -> "Tokenizer":
    """Loads the SentencePiece model at `path`.

    Args:
      path: a `tokenizer.model` file.
      legacy: the HF `legacy` flag; None reads it from the tokenizer_config.json
        beside `path`, and without one (or without a "legacy" in it) assumes
        True as HF's LlamaTokenizer does, logging that once per path.

    Returns:
      A `Tokenizer` whose `legacy_source` is "argument", "tokenizer_config.json"
      or "default".

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the tokenizer_config.json beside it is malformed.
    """
    if not paths.isfile(path):
      raise FileNotFoundError(f"tokenizer model {path} does not exist")
    proto = paths.read_bytes(path)
    source = "argument"
    if legacy is None:
      legacy, source = _legacy_from_config(paths.join(paths.dirname(path), CONFIG_NAME))
      if source == "default":
        _log_default_once(path)
    return cls(proto, legacy=legacy, name=path, legacy_source=source)

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def pad_id(self) -> int:
    return self.unk_id  # LLaMA has no pad token; pad with unk (masked anyway).

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def special_texts(self) -> tuple[str, ...]:
    """The texts that encode to a special id ("<s>", "</s>", "<unk>")."""
    return tuple(self._special_ids)

  def encode(self, text: str, bos: bool = False, dummy_prefix: bool = True) -> list[int]:
    """Text -> ids, HF style (special texts become their ids).

    Args:
      text: the string.
      bos: prepend the BOS id.
      dummy_prefix: whether the first segment gets the dummy "▁". False encodes
        text that continues earlier text (it must then start at a piece
        boundary, e.g. right before a space).
    """
    ids = [self.bos_id] if bos else []
    prefix = dummy_prefix
    for i, part in enumerate(self._special_re.split(text)):
      if i % 2:
        ids.append(self._special_ids[part])
        prefix = self.legacy
      elif part:
        ids += (self._sp if prefix else self._sp_bare).encode(part)
    return ids

  def decode(self, ids) -> str:
    """Ids -> text; ids outside the vocabulary (placeholders, -100) are skipped."""
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _legacy_from_config(cfg_path: str) -> tuple[bool, str]:
  """-> (legacy, where from): the file's "legacy", or (True, "default") when the
  file is absent or sets none (HF: a missing or null legacy means legacy).

  Raises ValueError (one line naming the file) for malformed JSON, a top level
  that is not an object, or a "legacy" that is not true, false or null.
  """
  if not paths.exists(cfg_path):
    return True, "default"
  try:
    cfg = json.loads(paths.read_bytes(cfg_path).decode("utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path}: malformed JSON at line {e.lineno} column {e.colno}: "
                     f"{e.msg}; fix it or remove the file (legacy then defaults to true)") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{cfg_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
  legacy = cfg.get("legacy")
  if legacy is None:
    return True, "default"
  if not isinstance(legacy, bool):
    raise ValueError(f"{cfg_path}: \"legacy\" must be true, false or null, got {legacy!r}")
  return legacy, CONFIG_NAME


def _log_default_once(path: str):
  """Logs, once per model path, that legacy=True was assumed."""
  if path in _warned_default:
    return
  _warned_default.add(path)
  if paths.exists(paths.join(paths.dirname(path), CONFIG_NAME)):
    why = f"the {CONFIG_NAME} beside it sets no \"legacy\""
  else:
    why = f"no {CONFIG_NAME} beside it"
  log.warning("%s: %s; assuming legacy=True as HF's LlamaTokenizer does", path, why)


def train_tokenizer(texts, out_path: str, vocab_size: int = 512, **kwargs) -> str:
  """Trains a small LLaMA-like BPE model on `texts` (strings).

  Deterministic: the same texts and options give the same bytes. `kwargs`
  override the SentencePiece trainer options. Writes and returns `out_path`.
  """
  options = dict(
      model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
      split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", allow_whitespace_only_pieces=True,
      character_coverage=1.0, hard_vocab_limit=False, max_sentencepiece_length=16,
      num_threads=1, minloglevel=2)
  options.update(kwargs)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=model,
                                 **options)
  paths.makedirs(paths.dirname(paths.absolute(out_path)))
  return paths.write_bytes_atomic(out_path, model.getvalue())


def conversation_texts(json_paths, skipped: list | None = None) -> list[str]:
  """The "value" texts of every turn of LLaVA conversation JSON files.

  Each text has its `<image>` placeholders removed and is stripped; empty
  texts are left out. Records whose turns are readable but untemplatable (e.g.
  an image without `<image>`) still give their texts; records without readable
  turns (no or empty `conversations`, a non-string value) give none and are listed
  in `skipped`, the same records training skips.

  Args:
    json_paths: LLaVA JSON files (arrays of {"id", "conversations", ...}).
    skipped: where the one-line reasons of records without readable turns go; None:
      such a record is an error.

  Returns:
    The texts, file by file, record by record, turn by turn.

  Raises:
    ValueError: a file is missing or malformed, or (`skipped` None) a record has no
      readable turns (the message names the file, the record's index and id).
  """
  texts = []
  for path in json_paths:
    for i, rec in enumerate(sources.load_llava_json(path)):
      turns = rec.get("conversations") if isinstance(rec, dict) else None
      if not (isinstance(turns, list) and all(
          isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)):
        problem = records_lib.structure_problem(rec, i, path)
        why = problem.message if problem else f"{path}: record {i}: unreadable turns"
        if skipped is None:
          raise ValueError(f"{why}; fix or remove the record")
        skipped.append(why)
        continue
      for turn in turns:
        text = turn["value"].replace("<image>", "").strip()
        if text:
          texts.append(text)
  return texts


def required_vocab_size(texts) -> int:
  """The smallest vocab_size SentencePiece accepts for `texts`: the special and
  byte-fallback pieces plus one piece per distinct character ("▁" for spaces)."""
  chars = set("▁")
  for t in texts:
    chars.update(t)
  chars.discard(" ")
  return NUM_FIXED_PIECES + len(chars)


def tokenizer_config(legacy: bool) -> dict:
  """The tokenizer_config.json written beside a trained model: HF's LlamaTokenizer
  with our special pieces and the chosen `legacy` flag."""
  return {"tokenizer_class": "LlamaTokenizer", "legacy": bool(legacy),
          "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
          "add_bos_token": True, "add_eos_token": False, "padding_side": "right",
          "clean_up_tokenization_spaces": False}


def train_from_json(json_paths, out_path: str, vocab_size: int, legacy: bool = False,
                    overwrite: bool = False) -> dict:
  """Trains a tokenizer on the conversation texts of `json_paths`.

  Writes `out_path` and a tokenizer_config.json beside it recording `legacy`.

  Args:
    json_paths: LLaVA JSON files.
    out_path: the `tokenizer.model` to write.
    vocab_size: the pieces asked for; SentencePiece may give fewer (no hard limit).
    legacy: the HF `legacy` flag recorded for every later load.
    overwrite: replace an existing model and config.

  Returns:
    {"path", "config", "vocab_size" (the model's real size), "num_texts", "skipped"
    (one line per record without readable turns, which gave no text)}.

  Raises:
    ValueError: bad input, one line naming the culprit and what to do.
  """
  if not json_paths:
    raise ValueError("--json is empty: give one or more LLaVA JSON files, comma-separated")
  config = paths.join(paths.dirname(paths.absolute(out_path)), CONFIG_NAME)
  if paths.isdir(out_path):
    raise ValueError(f"--out={out_path} is a directory; give the path of the model file, "
                     f"e.g. {paths.join(out_path, 'tokenizer.model')}")
  for existing in (out_path, config):
    if paths.exists(existing) and not overwrite:
      raise ValueError(f"{existing} exists; pass --overwrite to replace it or choose another "
                       f"--out")
  skipped = []
  texts = conversation_texts(json_paths, skipped)
  if not texts:
    raise ValueError(f"{','.join(json_paths)}: no conversation text to train on")
  need = required_vocab_size(texts)
  if vocab_size < need:
    raise ValueError(f"--vocab_size={vocab_size} is too small: the 3 special pieces, the 256 "
                     f"byte-fallback pieces and the {need - NUM_FIXED_PIECES} distinct "
                     f"characters of the texts need at least {need}")
  longest = max(len(t.encode("utf-8")) for t in texts)
  try:
    train_tokenizer(texts, out_path, vocab_size=vocab_size,
                    max_sentence_length=max(4192, longest + 1))
  except RuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"SentencePiece could not train a {vocab_size}-piece model on "
                     f"{len(texts)} texts: {first}") from None
  paths.write_text_atomic(config, json.dumps(tokenizer_config(legacy), indent=2))
  tok = Tokenizer.load(out_path)
  return {"path": out_path, "config": config, "vocab_size": tok.vocab_size,
          "num_texts": len(texts), "skipped": skipped}


def _define_flags():
  """The command's flags (defined only when run as a program)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_list("json", [], "LLaVA conversation JSON files, comma-separated.")
  flags.DEFINE_string("out", None, "The tokenizer.model to write (tokenizer_config.json "
                      "goes beside it).")
  flags.DEFINE_integer("vocab_size", 1024, "Pieces to ask for; SentencePiece may give fewer.")
  flags.DEFINE_bool("legacy", False, "The HF `legacy` flag to record in tokenizer_config.json.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing model and tokenizer_config.json.")
  return flags.FLAGS


def main(argv):
  """Trains and writes the tokenizer; bad input exits with one `error: ...` line."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  args = flags.FLAGS
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments {' '.join(argv[1:])}; all options are --flags")
    if not args.out:
      raise ValueError("--out is required: the path of the tokenizer.model to write")
    info = train_from_json(args.json, args.out, args.vocab_size, args.legacy, args.overwrite)
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {info['path']}: vocab_size {info['vocab_size']} (asked {args.vocab_size}), "
        f"{info['num_texts']} texts from {len(args.json)} file(s); legacy={args.legacy} in "
        f"{info['config']}")
  if info["skipped"]:
    print(f"{len(info['skipped'])} record(s) without readable turns gave no text (first: "
          f"{info['skipped'][0]})")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
