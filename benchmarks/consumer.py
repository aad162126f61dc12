"""A consumer process for the benchmarks: embeds sample texts, reports, then waits.

``local`` loads its own SentenceTransformer (the naive setup); ``copied`` does the same
and then copies every weight into private memory, as a ``.bin`` checkpoint, a dtype
conversion or a GPU would; ``client`` uses the host through the torch-free client.
It prints one JSON line when its vectors are ready and exits when stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import time

SAMPLE = [
    "서울특별시의 2023년 인구는 약 940만 명이다.",
    "부산광역시 해운대구의 관광객 수는 해마다 늘고 있다.",
    "The quarterly report lists revenue, cost and margin by region.",
    "표 3은 연도별 등록금과 장학금 지급 현황을 보여준다.",
] * 16


def main() -> None:
    mode, model = sys.argv[1], sys.argv[2]
    started = time.perf_counter()
    if mode == "client":
        from shm_model.client import HostClient

        client = HostClient()
        vectors = client.encode(SAMPLE)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        from config.model_config import ModelConfig
        from workers.backends import resolve_model

        torch.set_num_threads(1)
        st = SentenceTransformer(resolve_model(ModelConfig(name=model)).location, device="cpu")
        if mode == "copied":
            for tensor in list(st.parameters()) + list(st.buffers()):
                tensor.data = tensor.data.clone()
        vectors = st.encode(SAMPLE, batch_size=32)
    print(
        json.dumps({"pid": os.getpid(), "first_vector_s": time.perf_counter() - started, "shape": list(vectors.shape)}),
        flush=True,
    )
    sys.stdin.read()


if __name__ == "__main__":
    main()
