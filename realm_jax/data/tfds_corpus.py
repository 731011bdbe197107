"""TFDS builder for a passages JSONL corpus (+ entity spans), readable without TensorFlow.

    builder = RealmCorpus(data_dir=..., passages=..., entities=...)
    builder.download_and_prepare(file_format="array_record")
    documents = read_tfds_documents(builder)

Records are validated by `realm_jax.data.corpus.read_documents`, so the TFDS path and the
JSONL path yield the same documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from realm_jax.data.corpus import Document, read_documents


class RealmCorpus(tfds.core.GeneratorBasedBuilder):
  """Wikipedia passages with pre-computed salient-span candidates (one split: train)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Passages JSONL + spaCy entity spans."}

  def __init__(self, *, passages: str | Path | None = None, entities: str | Path | None = None, **kwargs):
    self._passages = passages
    self._entities = entities
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
    return self.dataset_info_from_configs(features=features, supervised_keys=None, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    if self._passages is None:
      raise ValueError("RealmCorpus needs passages=<path to passages.jsonl> to prepare")
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
