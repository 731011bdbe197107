"""Converts a Hugging Face `pytorch_model.bin` into `model.safetensors` (same tensor names, float32 kept as is).

realm-jax reads safetensors only.  Some google/realm-* repositories ship only `pytorch_model.bin`, a pickle:
this tool opens it with `torch.load(..., weights_only=True)` (plain tensors only, no code executed) and needs
torch, the optional extra `pip install -e '.[convert]'`.  The library itself never imports torch.

  python tools/convert_pytorch_bin.py /path/to/realm-cc-news-pretrained-encoder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.numpy import save_file


def convert(model_dir: Path) -> Path:
  """Writes `model_dir/model.safetensors` from `model_dir/pytorch_model.bin`; tied copies stay separate tensors."""
  import torch

  source, target = model_dir / "pytorch_model.bin", model_dir / "model.safetensors"
  if not source.exists():
    raise FileNotFoundError(f"{source}: not found")
  if target.exists():
    raise FileExistsError(f"{target}: already exists (remove it to convert again)")
  state = torch.load(source, map_location="cpu", weights_only=True)
  bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise ValueError(f"{source}: entries that are not tensors: {bad}")
  tensors = {k: v.detach().contiguous().numpy().copy() for k, v in sorted(state.items())}
  save_file(tensors, str(target), metadata={"format": "pt"})
  return target


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("model_dirs", nargs="+", type=Path, help="directories holding pytorch_model.bin")
  for model_dir in parser.parse_args().model_dirs:
    print(f"wrote {convert(model_dir)}")


if __name__ == "__main__":
  main()
