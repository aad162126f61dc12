#!/usr/bin/env bash
# Install everything, start the model host on the bundled model, embed sample Korean
# sentences through it, show its status, and keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh host
export HF_HUB_OFFLINE=1 MODEL_NAME="${MODEL_NAME:-bundled}"
export SHM_MODEL_SOCKET="${SHM_MODEL_SOCKET:-$PWD/.run/host.sock}"
mkdir -p .run && chmod 700 .run
.venv/bin/shm-model serve &
host=$!
trap 'kill -TERM $host 2>/dev/null; wait $host' EXIT INT TERM
.venv/bin/python - <<'PY'
from shm_model import HostClient, wait_for_host

wait_for_host(timeout=120)
client = HostClient()
sentences = [
    "서울특별시의 2023년 인구는 약 940만 명이다.",
    "부산광역시의 2023년 인구는 약 330만 명이다.",
    "표 3은 연도별 등록금과 장학금 지급 현황을 보여준다.",
]
vectors = client.encode(sentences, normalize_embeddings=True)
print(f"embedded {len(sentences)} sentences through the host: shape {vectors.shape}")
print("cosine(서울, 부산) = %.3f, cosine(서울, 등록금) = %.3f"
      % (vectors[0] @ vectors[1], vectors[0] @ vectors[2]))
PY
.venv/bin/shm-model status
echo "host serving on $SHM_MODEL_SOCKET; try: SHM_MODEL_SOCKET=$SHM_MODEL_SOCKET .venv/bin/shm-model encode 안녕하세요"
echo "Ctrl-C stops it."
wait $host
