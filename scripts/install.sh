#!/usr/bin/env bash
# Create .venv and install the project with the given extras. torch is pinned first to
# the CPU build that lies on this kind of machine; an unpinned torch pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-host}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extras}]"
