#!/usr/bin/env bash
# Runs the test suite (8 fake CPU devices) after creating/reusing .venv. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest tests "$@"
