"""OpenAI's embeddings API: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{id}``."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.json_body import JSONRoute
from api.schemas import EmbeddingsRequest
from api.state import AppState, AppStateDep
from api.tokens import check_dimensions, served_model, served_models, texts_of

router = APIRouter(route_class=JSONRoute)


def model_card(info: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(info["model"]), "object": "model", "created": 0, "owned_by": "shm-model"}


def openai_embed(api: AppState, body: EmbeddingsRequest) -> JSONResponse:
    served = api.served()
    info = served_model(body.model, served)
    dimensions = check_dimensions(body.dimensions, info)
    texts = texts_of(api, body.input, "input", info)
    several = len(served_models(served)) > 1  # the model to use is named only when there is a choice
    vectors, tokens = api.model().encode(
        texts,
        normalize_embeddings=True,
        truncate_dim=dimensions,
        return_usage=True,
        **({"model": str(info["model"])} if several else {}),
    )
    data = []
    for i, vector in enumerate(np.asarray(vectors, dtype=np.float32)):
        if body.encoding_format == "base64":
            embedding: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        else:
            embedding = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": str(info["model"]),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )  # rendered here, in the thread, not on the event loop


@router.get("/v1/models")
def models(api: AppStateDep) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(info) for info in served_models(api.served())]}


@router.get("/v1/models/{model_id:path}")
def model_by_id(model_id: str, api: AppStateDep) -> dict[str, Any]:
    return model_card(served_model(model_id, api.served()))


@router.post("/v1/embeddings", response_model=None)
async def embeddings(body: EmbeddingsRequest, api: AppStateDep) -> JSONResponse:
    return await api.admission["/v1/embeddings"].run(openai_embed, api, body)
