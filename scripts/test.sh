#!/usr/bin/env bash
# Install everything and run the whole test suite (lint included). Slow benchmarks are
# marked and left out; run them with: .venv/bin/python -m pytest -m slow
#
# With no arguments, the tests run in two parts: first those not marked serial, one file per
# pytest-xdist process (as many processes as cores, at most 4), then the serial ones (they bound
# wall-clock time or need the CPU to themselves) alone. With arguments, pytest gets them as they
# are, in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export HF_HUB_OFFLINE=1
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
processes=$(nproc)
processes=$((processes < 4 ? processes : 4))
status=0
.venv/bin/python -m pytest -n "$processes" --dist loadfile -m "not slow and not serial" || status=$?
.venv/bin/python -m pytest -m "serial and not slow" || status=$((status ? status : $?))
exit "$status"
