r"""Builds the block store: documents -> <= 288-word-piece blocks with entity spans.

  python launch/build_blocks.py --passages=data/demo/passages.jsonl \
    --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=workdir/blocks

With --tfds_data_dir the corpus is first prepared as a TFDS dataset (array_record) and read back
through it; the blocks are identical to the JSONL path.
"""

from __future__ import annotations

import json

from absl import app, flags

from realm_jax.data.blocks import build_block_store
from realm_jax.data.corpus import fingerprint_files, read_documents
from realm_jax.data.tokenization import load_tokenizer, minilm_dir

_PASSAGES = flags.DEFINE_string("passages", "data/demo/passages.jsonl", "Passages JSONL {id,title,text}.")
_ENTITIES = flags.DEFINE_string(
    "entities", "data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl",
    "Entity spans JSONL {id, ents}, line-aligned with --passages ('' for none).",
)
_VOCAB = flags.DEFINE_string("vocab", None, "vocab.txt (WordPiece) or *.model (SentencePiece); "
                             "default: the MiniLM wheel's uncased BERT vocabulary.")
_OUT = flags.DEFINE_string("out", "workdir/blocks", "Output block-store directory.")
_MAX_BLOCK_LEN = flags.DEFINE_integer(
    "max_block_len", 288, "Word pieces per block incl. [CLS] title [SEP] ... [SEP]."
)
_MAX_TITLE_LEN = flags.DEFINE_integer("max_title_len", 64, "Titles are truncated to this many word pieces.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Go through the TFDS builder with this data_dir.")


def main(argv):
  del argv
  tokenizer = load_tokenizer(_VOCAB.value or minilm_dir() / "vocab.txt")
  entities = _ENTITIES.value or None
  if _TFDS_DATA_DIR.value:
    from realm_jax.data.tfds_corpus import RealmCorpus, read_tfds_documents

    builder = RealmCorpus(data_dir=_TFDS_DATA_DIR.value, passages=_PASSAGES.value, entities=entities)
    builder.download_and_prepare(file_format="array_record")
    documents = read_tfds_documents(builder)
    total = builder.info.splits["train"].num_examples
  else:
    documents = read_documents(_PASSAGES.value, entities)
    total = sum(1 for line in open(_PASSAGES.value, encoding="utf-8") if line.strip())
  manifest = build_block_store(
      documents, _OUT.value, tokenizer, fingerprint_files(_PASSAGES.value, entities),
      max_block_len=_MAX_BLOCK_LEN.value, max_title_len=_MAX_TITLE_LEN.value, total=total,
  )
  print(json.dumps({"out": _OUT.value, "num_blocks": manifest["num_blocks"], **manifest["stats"]}, indent=2))


if __name__ == "__main__":
  app.run(main)
