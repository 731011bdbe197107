"""Tokenizers: WordPiece gives the original BERT ids on real text; SentencePiece trains and aligns."""

import json

import numpy as np
import pytest
from conftest import DEMO_PASSAGES, REPO
from tokenizers import Tokenizer as HFTokenizer

from realm_jax.data.tokenization import SentencePieceTokenizer, WordPieceTokenizer, load_tokenizer


def _demo_texts(n: int) -> list[str]:
  with DEMO_PASSAGES.open(encoding="utf-8") as f:
    return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]


def test_wordpiece_ids_equal_the_reference_bert_tokenizer(wordpiece):
  cases = json.loads((REPO / "tests/data/minilm_reference.json").read_text())["tokenizer_cases"]
  assert len(cases) == 10
  for case in cases:
    ids, _ = wordpiece.encode(case["text"])
    assert ids.tolist() == case["ids"], case["text"][:80]


def test_wordpiece_matches_the_wheels_tokenizer_json_on_demo_passages(wordpiece, minilm_path):
  reference = HFTokenizer.from_file(str(minilm_path / "tokenizer.json"))
  reference.no_padding()
  reference.no_truncation()
  for text in _demo_texts(300):
    expected = reference.encode(text, add_special_tokens=False).ids
    assert wordpiece.encode(text)[0].tolist() == expected


def test_wordpiece_offsets_point_at_the_source_characters(wordpiece):
  text = "Wilhelm Conrad Röntgen received 150,782 SEK."
  ids, offsets = wordpiece.encode(text)
  pieces = [text[s:e] for s, e in offsets]
  assert pieces[:5] == ["Wilhelm", "Conrad", "Rön", "t", "gen"]
  assert "".join(pieces) == text.replace(" ", "")
  assert [wordpiece.id_to_token(int(i)) for i in ids[2:5]] == ["ron", "##t", "##gen"]
  assert (wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id, wordpiece.pad_id) == (101, 102, 103, 0)


def test_sentencepiece_trains_a_vocabulary_with_bert_special_pieces(tmp_path):
  model = SentencePieceTokenizer.train(_demo_texts(800), tmp_path / "sp.model", vocab_size=2000)
  tok = load_tokenizer(model)
  assert isinstance(tok, SentencePieceTokenizer)
  assert (tok.pad_id, tok.unk_id) == (0, 1)
  assert tok.vocab_size == 2000
  text = "Deadpool 2 is scheduled to be released in the United States on May 18, 2018 — Röntgen."
  ids, offsets = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.unk_id not in ids  # byte fallback
  # Offsets are character offsets (not UTF-8 bytes) and cover the text in order.
  assert np.all(np.diff(offsets[:, 0]) >= 0)
  assert text[offsets[-1, 0] : offsets[-1, 1]] == "."
  assert "ö" in [text[s:e] for s, e in offsets]


def test_missing_vocabulary_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    WordPieceTokenizer(tmp_path / "nope.txt")
  (tmp_path / "tiny.txt").write_text("[PAD]\n[UNK]\nhello\n")
  with pytest.raises(ValueError, match=r"lacks special tokens \['\[CLS\]'"):
    WordPieceTokenizer(tmp_path / "tiny.txt")


def test_a_vocabulary_that_is_not_text_or_a_model_that_is_not_sentencepiece_is_named(tmp_path):
  from realm_jax.errors import InputError

  (tmp_path / "vocab.txt").write_bytes(b"[PAD]\n[UNK]\n\xff\xfe\n")
  with pytest.raises(InputError, match=r"vocab.txt:3: not UTF-8 text"):
    load_tokenizer(tmp_path / "vocab.txt")
  (tmp_path / "junk.model").write_bytes(b"\x00not a model" * 10)
  with pytest.raises(InputError, match=r"junk.model: not a SentencePiece model"):
    load_tokenizer(tmp_path / "junk.model")
