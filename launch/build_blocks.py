r"""Builds the block store: documents -> <= 288-word-piece blocks with entity spans.

  python launch/build_blocks.py --passages=data/demo/passages.jsonl \
    --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=workdir/blocks

With --tfds_data_dir the corpus is first prepared as a TFDS dataset (array_record) and read back
through it; the blocks are identical to the JSONL path.

--out=gs://BUCKET/blocks builds in a local temporary directory (--tmp_dir), then uploads every file and the
manifest last; it refuses, before building, a prefix under which anything exists.  Jobs read a staged local
copy: python launch/stage_blocks.py --source=gs://BUCKET/blocks --dest=/local/dir
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import flags

from launch import cli
from realm_jax import storage
from realm_jax.data import staging
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
_OUT = flags.DEFINE_string("out", "workdir/blocks", "Output block-store directory, local or a new gs:// prefix.")
_MAX_BLOCK_LEN = flags.DEFINE_integer(
    "max_block_len", 288, "Word pieces per block incl. [CLS] title [SEP] ... [SEP]."
)
_MAX_TITLE_LEN = flags.DEFINE_integer("max_title_len", 64, "Titles are truncated to this many word pieces.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Go through the TFDS builder with this data_dir.")
_TMP_DIR = flags.DEFINE_string("tmp_dir", None, "Local directory for the build before a gs:// upload "
                               "(default: the system's temporary directory).")


def main(argv):
  del argv
  remote = storage.is_remote(_OUT.value)
  if remote:
    staging.check_new_remote_store(_OUT.value)
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

  def build(out: str) -> dict:
    return build_block_store(
        documents, out, tokenizer, fingerprint_files(_PASSAGES.value, entities),
        max_block_len=_MAX_BLOCK_LEN.value, max_title_len=_MAX_TITLE_LEN.value, total=total,
    )

  if remote:
    with tempfile.TemporaryDirectory(prefix="realm-jax-blocks-", dir=_TMP_DIR.value) as tmp:
      manifest = build(os.path.join(tmp, "blocks"))
      staging.upload_block_store(os.path.join(tmp, "blocks"), _OUT.value)
  else:
    manifest = build(_OUT.value)
  print(json.dumps({"out": _OUT.value, "num_blocks": manifest["num_blocks"], **manifest["stats"]}, indent=2))


if __name__ == "__main__":
  cli.run(main)
