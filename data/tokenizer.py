"""SentencePiece tokenizer with the semantics of HF's slow `LlamaTokenizer`.

LLaMA conventions: <unk> = 0, <s> = 1, </s> = 2, pad = unk, byte fallback (a
character outside the vocabulary becomes its UTF-8 bytes, "\\n" = <0x0A>).

The texts of the special tokens (`<s>`, `</s>`, `<unk>`) inside a string become
their ids, as HF splits them out before SentencePiece sees the text. The text
is then encoded segment by segment: the first segment gets SentencePiece's
dummy-prefix "▁", a segment after a special token gets it only when `legacy`
is true. That is `LlamaTokenizer(legacy=...)` in transformers 4.x, which the
official LLaVA code uses (`use_fast=False`); `legacy` is read from the
`tokenizer_config.json` next to the model and defaults to true, as in HF.
"""
import io
import json
import os
import re

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2


class Tokenizer:
  """A LLaMA SentencePiece model (bytes of a `tokenizer.model`)."""

  def __init__(self, model_proto: bytes, legacy: bool = True, name: str = "<memory>"):
    self.name = name
    self.legacy = bool(legacy)
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
    """Loads `path`; `legacy=None` reads it from a tokenizer_config.json beside it."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer model {path} does not exist")
    with open(path, "rb") as f:
      proto = f.read()
    if legacy is None:
      legacy = _legacy_from_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    return cls(proto, legacy=legacy, name=path)

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


def _legacy_from_config(cfg_path: str) -> bool:
  if not os.path.exists(cfg_path):
    return True
  with open(cfg_path) as f:
    legacy = json.load(f).get("legacy", True)
  return True if legacy is None else bool(legacy)  # HF: None means legacy.


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
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, out_path)
  return out_path
