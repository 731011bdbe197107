r"""Builds the block store: documents -> <= 288-word-piece blocks with entity spans.

  python launch/build_blocks.py --passages=data/demo/passages.jsonl \
    --entities=data/demo/entities_spacy_en_core_web_sm_3.8.0.jsonl --out=workdir/blocks

Without --entities there are no entity spans: salient-span masking then has only the date-regex spans to mask.
A document without word pieces (empty text) stops the build naming its line; --skip_empty_documents skips and
counts such documents instead.

A local --out must be absent, an empty directory, or a block store, which is replaced only with --overwrite (a
directory holding anything else is refused, even with --overwrite, and left untouched).  These checks run before
anything is read.  The store is built in a hidden sibling (`.<out>.staging-<id>`, removed on failure) and renamed
into place when complete, so a failed build leaves nothing behind.

With --tfds_data_dir the corpus is first prepared as a TFDS dataset (array_record) and read back
through it; the blocks are identical to the JSONL path.  A data_dir prepared from another corpus is refused.

The JSONL input is split into shards of --records_per_shard passages built by --workers processes (default: one
per core) in `.<out>.building/` beside --out; a build that was stopped resumes there, keeping its finished shards,
and the shards are merged into one store identical to a single-process build (`realm_jax.data.parallel_build`).

--out=gs://BUCKET/blocks builds in a local temporary directory (--tmp_dir), then uploads every file and the
manifest last; it refuses, before building, a prefix under which anything exists, and a failed upload deletes
what it wrote.  Jobs read a staged local copy: python launch/stage_blocks.py --source=gs://BUCKET/blocks
--dest=/local/dir.  launch/verify_blocks.py --store=... checks a store's every byte.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import flags

from launch import cli
from realm_jax import storage
from realm_jax.data import staging
from realm_jax.data.blocks import build_block_store, check_block_store_destination
from realm_jax.data.corpus import fingerprint_files
from realm_jax.data.parallel_build import build_sharded, default_workers
from realm_jax.data.tokenization import load_tokenizer, minilm_dir
from realm_jax.errors import InputError

_PASSAGES = flags.DEFINE_string("passages", "data/demo/passages.jsonl", "Passages JSONL {id,title,text}.")
_ENTITIES = flags.DEFINE_string(
    "entities", None,
    "Entity spans JSONL {id, ents}, line-aligned with --passages (default: none, so salient-span masking has only "
    "the date-regex spans).",
)
_VOCAB = flags.DEFINE_string("vocab", None, "vocab.txt (WordPiece) or *.model (SentencePiece); "
                             "default: the MiniLM wheel's uncased BERT vocabulary.")
_OUT = flags.DEFINE_string("out", "workdir/blocks", "Output block-store directory, local or a new gs:// prefix.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the block store at a local --out (only a block store).")
_SKIP_EMPTY = flags.DEFINE_bool("skip_empty_documents", False,
                                "Skip documents without word pieces (and count them) instead of stopping.")
_MAX_BLOCK_LEN = flags.DEFINE_integer(
    "max_block_len", 288, "Word pieces per block incl. [CLS] title [SEP] ... [SEP]."
)
_MAX_TITLE_LEN = flags.DEFINE_integer("max_title_len", 64, "Titles are truncated to this many word pieces.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Go through the TFDS builder with this data_dir.")
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes for the JSONL input (default: one per core).")
_RECORDS_PER_SHARD = flags.DEFINE_integer("records_per_shard", 50_000,
                                          "Passages per shard: the unit of parallel work and of resumption.")
_TMP_DIR = flags.DEFINE_string("tmp_dir", None, "Local directory for the build before a gs:// upload "
                               "(default: the system's temporary directory).")


def main(argv):
  del argv
  remote = storage.is_remote(_OUT.value)
  if remote and _OVERWRITE.value:
    raise InputError(f"--overwrite: replaces a local --out only; a gs:// store is uploaded to a new prefix, so give "
                     f"another --out than {_OUT.value}")
  if remote:
    staging.check_new_remote_store(_OUT.value)
  else:
    check_block_store_destination(_OUT.value, _OVERWRITE.value)
  entities = _ENTITIES.value or None
  if entities is None:
    print("note: no --entities, so the blocks have no entity spans: salient-span masking has only the date-regex "
          "spans to mask", file=sys.stderr)
  fingerprint = fingerprint_files(_PASSAGES.value, entities)
  vocab = os.fspath(_VOCAB.value or minilm_dir() / "vocab.txt")
  tokenizer = load_tokenizer(vocab)

  def build(out: str) -> dict:
    if not _TFDS_DATA_DIR.value:
      return build_sharded(
          _PASSAGES.value, entities, out, vocab, fingerprint, max_block_len=_MAX_BLOCK_LEN.value,
          max_title_len=_MAX_TITLE_LEN.value, skip_empty_documents=_SKIP_EMPTY.value, overwrite=_OVERWRITE.value,
          workers=_WORKERS.value or default_workers(), records_per_shard=_RECORDS_PER_SHARD.value)
    from realm_jax.data.tfds_corpus import prepare_corpus, read_tfds_documents

    builder = prepare_corpus(_TFDS_DATA_DIR.value, _PASSAGES.value, entities, fingerprint)
    return build_block_store(
        read_tfds_documents(builder), out, tokenizer, fingerprint, max_block_len=_MAX_BLOCK_LEN.value,
        max_title_len=_MAX_TITLE_LEN.value, total=builder.info.splits["train"].num_examples,
        source=_PASSAGES.value, skip_empty_documents=_SKIP_EMPTY.value, overwrite=_OVERWRITE.value,
    )

  if remote:
    with tempfile.TemporaryDirectory(prefix="realm-jax-blocks-", dir=_TMP_DIR.value) as tmp:
      manifest = build(os.path.join(tmp, "blocks"))
      staging.upload_block_store(os.path.join(tmp, "blocks"), _OUT.value)
  else:
    manifest = build(_OUT.value)
  stats = manifest["stats"]
  print(json.dumps({"out": _OUT.value, "num_blocks": manifest["num_blocks"],
                    "documents_skipped_empty": stats.get("documents_skipped_empty", 0), **stats}, indent=2))


if __name__ == "__main__":
  cli.run(main)
