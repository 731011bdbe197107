"""TFDS builder for a passages JSONL corpus (+ entity spans), readable without TensorFlow.

    builder = prepare_corpus(data_dir, passages, entities)  # RealmCorpus, prepared as array_record
    documents = read_tfds_documents(builder)

Records are validated by `realm_jax.data.corpus.read_documents`, so the TFDS path and the
JSONL path yield the same documents.  The prepared dataset records the corpus fingerprint (sha256 of the
passages and entity files) in its metadata (`metadata.json`); `prepare_corpus` refuses a data_dir whose dataset
was prepared from another corpus (it is never rebuilt or deleted).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from realm_jax.data.corpus import Document, fingerprint_files, read_documents
from realm_jax.errors import InputError

FINGERPRINT_KEY = "corpus_fingerprint"


class RealmCorpus(tfds.core.GeneratorBasedBuilder):
  """Wikipedia passages with pre-computed salient-span candidates (one split: train)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Passages JSONL + spaCy entity spans."}

  def __init__(self, *, passages: str | Path | None = None, entities: str | Path | None = None,
               corpus_fingerprint: str | None = None, **kwargs):
    self._passages = passages
    self._entities = entities
    self._fingerprint = corpus_fingerprint
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "title": tfds.features.Text(),
        "text": tfds.features.Text(),
        "span_starts": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "span_ends": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "span_labels": tfds.features.Sequence(tfds.features.Text()),
    })
    return self.dataset_info_from_configs(features=features, supervised_keys=None, disable_shuffling=True,
                                          metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    if self._passages is None:
      raise ValueError("RealmCorpus needs passages=<path to passages.jsonl> to prepare")
    self.info.metadata[FINGERPRINT_KEY] = self._fingerprint or fingerprint_files(self._passages, self._entities)
    return {"train": self._generate_examples(self._passages, self._entities)}

  def _generate_examples(self, passages, entities):
    for index, doc in enumerate(read_documents(passages, entities)):
      yield index, {
          "id": doc.doc_id,
          "title": doc.title,
          "text": doc.text,
          "span_starts": [s for s, _, _ in doc.spans],
          "span_ends": [e for _, e, _ in doc.spans],
          "span_labels": [label for _, _, label in doc.spans],
      }


def prepare_corpus(data_dir: str | Path, passages: str | Path, entities: str | Path | None = None,
                   corpus_fingerprint: str | None = None) -> RealmCorpus:
  """The RealmCorpus of `passages` (+ `entities`) in `data_dir`, prepared (array_record) unless it already is.

  A dataset already prepared there from another corpus (another fingerprint, or none recorded) is refused.
  """
  fingerprint = corpus_fingerprint or fingerprint_files(passages, entities)
  builder = RealmCorpus(data_dir=str(data_dir), passages=passages, entities=entities, corpus_fingerprint=fingerprint)
  if builder.is_prepared():
    recorded = dict(builder.info.metadata.items()).get(FINGERPRINT_KEY)  # items() loads metadata.json
    if recorded != fingerprint:
      raise InputError(
          f"{builder.data_dir}: --tfds_data_dir={data_dir} holds a corpus prepared from other files (corpus "
          f"fingerprint {recorded or 'not recorded'}), not from --passages={passages} --entities={entities} "
          f"(fingerprint {fingerprint}); it is neither reused nor deleted: give another --tfds_data_dir, or remove "
          f"{builder.data_dir} yourself to prepare it again")
  builder.download_and_prepare(file_format="array_record")
  return builder


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_tfds_documents(builder: tfds.core.DatasetBuilder, split: str = "train") -> Iterator[Document]:
  """Documents from a prepared builder, in record order (array_record random-access source)."""
  source = builder.as_data_source(split)
  for i in range(len(source)):
    r = source[i]
    labels = [_text(x) for x in r["span_labels"]]
    spans = tuple(zip(r["span_starts"].tolist(), r["span_ends"].tolist(), labels, strict=True))
    yield Document(_text(r["id"]), _text(r["title"]), _text(r["text"]), spans, f"tfds:{builder.name}[{i}]")
