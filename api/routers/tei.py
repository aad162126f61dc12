"""Text Embeddings Inference's API: ``POST /embed`` (also ``POST /``), ``POST /tokenize``,
``GET /info``, ``GET /health``."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.errors import error_response
from api.json_body import JSONRoute
from api.routers.health import READY_TIMEOUT
from api.schemas import MAX_INPUTS, EmbedRequest, TokenizeRequest
from api.state import AppState, AppStateDep
from api.tokens import check_dimensions, keep_last_tokens, texts_of, tokenize
from shm_model import errors

router = APIRouter(route_class=JSONRoute)


def pooling_of(folder: str) -> str:
    """The pooling of a sentence-transformers folder (``1_Pooling/config.json``), as TEI names it."""
    try:
        with open(os.path.join(folder, "1_Pooling", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "unknown"
    for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                      ("pooling_mode_lasttoken", "last_token")):  # fmt: skip
        if config.get(key):
            return name
    return "unknown"


def tei_embed(api: AppState, body: EmbedRequest) -> JSONResponse:
    info = api.served()
    dimensions = check_dimensions(body.dimensions, info)
    texts = texts_of(api, body.inputs, "inputs", info)
    truncate = bool(body.truncate)
    if truncate and body.truncation_direction.lower() == "left":
        prompt = (info.get("prompts") or {}).get(body.prompt_name or "", "")
        limit = int(info.get("max_seq_length") or 512)
        texts = [keep_last_tokens(api.tokenizer(info), text, prompt, limit) for text in texts]
    vectors = api.model().encode(
        texts,
        normalize_embeddings=body.normalize,
        truncate_dim=dimensions,
        truncate=truncate,
        prompt_name=body.prompt_name,
    )
    return JSONResponse(np.asarray(vectors, dtype=np.float32).tolist())


@router.post("/embed", response_model=None)
async def embed(body: EmbedRequest, api: AppStateDep) -> JSONResponse:
    return await api.admission["/embed"].run(tei_embed, api, body)


@router.post("/", response_model=None)
async def embed_at_root(body: EmbedRequest, api: AppStateDep) -> JSONResponse:
    """TEI's root route: an embedding model embeds (``InferenceClient(base_url)`` posts here)."""
    return await api.admission["/embed"].run(tei_embed, api, body)


def tei_tokenize(api: AppState, body: TokenizeRequest) -> JSONResponse:
    info = api.served()
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    prompt = ""
    if body.prompt_name is not None:
        prompts = info.get("prompts") or {}
        if body.prompt_name not in prompts:
            raise errors.BadRequest(
                f"unknown prompt_name {body.prompt_name[:80]!r}; this model has: {', '.join(prompts) or 'none'}"
            )
        prompt = prompts[body.prompt_name]
    return JSONResponse(tokenize(api.tokenizer(info), [prompt + t for t in texts], body.add_special_tokens))


@router.post("/tokenize", response_model=None)
async def tokenize_route(body: TokenizeRequest, api: AppStateDep) -> JSONResponse:
    return await api.admission["/tokenize"].run(tei_tokenize, api, body)


@router.get("/info")
def tei_info(request: Request, api: AppStateDep) -> dict[str, Any]:
    info = api.served()
    return {
        "model_id": str(info.get("model")),
        "model_sha": None,
        "model_dtype": "float32",
        "model_type": {"embedding": {"pooling": pooling_of(str(info.get("model_path") or ""))}},
        "max_concurrent_requests": api.settings.route_concurrency,
        "max_input_length": int(info.get("max_seq_length") or 0),
        "max_client_batch_size": MAX_INPUTS,
        "auto_truncate": False,
        "prompts": info.get("prompts") or {},
        "dimension": info.get("dimension"),
        "version": request.app.version,
    }


@router.get("/health", response_model=None)
def tei_health(api: AppStateDep) -> Response:
    try:
        api.model().encode("ready", timeout=READY_TIMEOUT)
    except errors.ShmModelError as exc:
        return error_response(503, exc.code, f"not ready: {exc}", path="/health")
    return Response(status_code=200)
