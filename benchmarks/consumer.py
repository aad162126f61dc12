"""A consumer process for the benchmarks.

    python -m benchmarks.consumer local|copied|client MODEL[,MODEL...]
        embeds sample texts (with each model), prints one JSON line, then waits until stdin closes;
    python -m benchmarks.consumer loop MODEL THREADS SECONDS
        loads its own model and prints a JSON line when ready; then, for each 'go' line on
        stdin, encodes one text at a time for SECONDS and prints the latencies as JSON.

``local`` loads its own SentenceTransformer (the naive setup); ``copied`` does the same
and then copies every weight into private memory, as a ``.bin`` checkpoint, a dtype
conversion or a GPU would; ``client`` uses the host through the torch-free client.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SAMPLE = [
    "서울특별시의 2023년 인구는 약 940만 명이다.",
    "부산광역시 해운대구의 관광객 수는 해마다 늘고 있다.",
    "The quarterly report lists revenue, cost and margin by region.",
    "표 3은 연도별 등록금과 장학금 지급 현황을 보여준다.",
] * 16


def _load(model: str, threads: int) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from benchmarks.common import model_location

    torch.set_num_threads(threads)
    return SentenceTransformer(model_location(model), device="cpu")


def _loop(model: str, threads: int, seconds: float) -> None:
    from benchmarks.common import SENTENCES

    st = _load(model, threads)
    st.encode(SAMPLE[:4])
    print(json.dumps({"pid": os.getpid()}), flush=True)
    i = 0
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        latencies = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            began = time.perf_counter()
            st.encode([SENTENCES[i % len(SENTENCES)]])
            latencies.append(time.perf_counter() - began)
            i += 1
        print(json.dumps({"latencies": latencies, "elapsed": time.perf_counter() - started}), flush=True)


def main() -> None:
    mode, model = sys.argv[1], sys.argv[2]
    if mode == "loop":
        _loop(model, int(sys.argv[3]), float(sys.argv[4]))
        return
    started = time.perf_counter()
    names = model.split(",")  # several models: a host serving them all, or each loaded here
    if mode == "client":
        from shm_model.client import HostClient

        client = HostClient(timeout=1800)
        shapes = [list(client.encode(SAMPLE, model=name if len(names) > 1 else None).shape) for name in names]
    else:
        shapes = []
        for name in names:
            st = _load(name, 1)
            if mode == "copied":
                for tensor in list(st.parameters()) + list(st.buffers()):
                    tensor.data = tensor.data.clone()
            shapes.append(list(st.encode(SAMPLE, batch_size=32).shape))
    print(
        json.dumps({"pid": os.getpid(), "first_vector_s": time.perf_counter() - started, "shape": shapes}), flush=True
    )
    sys.stdin.read()


if __name__ == "__main__":
    main()
