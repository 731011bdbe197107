"""What the benchmark scripts share: timing medians, this machine's matmul peak, BENCHMARKS.md sections."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  """Median wall time of `fn()` over `repeats` runs, after `warmup` untimed runs (compilation)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_flops(repeats: int) -> float:
  """Measured f32 FLOP/s of a 2048^3 matmul on the default JAX device."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda m: m @ m)
  return 2 * 2048**3 / median_time(lambda: f(a).block_until_ready(), repeats)


def write_section(path: Path, title: str, text: str, subsection: str | None = None) -> None:
  """Replaces the section headed `title` in the markdown file `path` where it stands (or appends it).

  With `subsection` (a `### ` heading's start, e.g. "### `--corpus_dir=data/demo`"), only that part of the section
  is replaced (or appended to it): `text` starts with the whole heading; the section's other runs and its
  introduction stay.  One section per benchmark, one subsection per run of it.
  """
  existing = path.read_text() if path.exists() else "# Benchmarks\n\nEach section names the command that produced it.\n"
  found = re.compile(re.escape(title) + r".*?(?=\n## |\Z)", re.S).search(existing)
  text = text.rstrip("\n") + "\n"
  if subsection is not None:
    body = found.group(0) if found else title + "\n"
    part = re.compile(r"\n" + re.escape(subsection) + r".*?(?=\n### |\n## |\Z)", re.S).search(body)
    body = body[:part.start()] + "\n" + text + body[part.end():] if part else body.rstrip() + "\n\n" + text
    text = body.rstrip("\n") + "\n"
  if found:
    path.write_text(existing[:found.start()] + text + existing[found.end():])
  else:
    path.write_text(existing.rstrip() + "\n\n" + text)
