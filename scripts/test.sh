#!/usr/bin/env bash
# Install everything and run the whole test suite (lint included). Slow benchmarks are
# marked and left out; run them with: .venv/bin/python -m pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
