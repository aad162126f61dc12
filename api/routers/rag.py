"""Search and chat over the ingested documents: ``POST /search``, ``POST /chat``."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from api.json_body import JSONRoute
from api.schemas import ChatRequest, SearchRequest
from api.state import AppState, AppStateDep
from shm_model import errors
from tablerag.answers import citations, llm_answer, respond

router = APIRouter(route_class=JSONRoute)


def find(api: AppState, body: SearchRequest) -> JSONResponse:
    finder = api.retriever()
    finder.check_model()
    hits = finder.search(body.query, k=body.k, mode=body.mode)
    results, truncated = citations(hits)
    return JSONResponse({"query": body.query, "mode": body.mode, "results": results, "truncated": truncated})


@router.post("/search", response_model=None)
async def search(body: SearchRequest, api: AppStateDep) -> JSONResponse:
    if not body.query.strip():
        raise errors.BadRequest("query: only whitespace")
    return await api.admission["/search"].run(find, api, body)


def answer(api: AppState, body: ChatRequest) -> JSONResponse | StreamingResponse:
    settings = api.settings
    finder = api.retriever()
    finder.check_model()
    reply = respond(body.question, finder.search(body.question, k=body.k, mode=body.mode))
    sources, truncated = citations(reply.hits)
    hits = reply.hits[: len(sources)]
    generated = bool(settings.chat_base) and not reply.declined
    if generated:
        pieces: Iterator[str] = llm_answer(settings.chat_endpoint(), body.question, hits)
    else:
        pieces = iter([reply.text])
    kind = "generated" if generated else "extracted"
    declined = reply.declined
    if not body.stream:
        return JSONResponse(
            {
                "question": body.question,
                "answer": "".join(pieces),
                "answer_type": kind,
                "declined": declined,
                "sources": sources,
                "truncated": truncated,
            }
        )

    def events() -> Iterator[str]:
        head = json.dumps(
            {"answer_type": kind, "declined": declined, "sources": sources, "truncated": truncated},
            ensure_ascii=False,
        )
        yield f"event: sources\ndata: {head}\n\n"
        try:
            for piece in pieces:
                yield f"data: {json.dumps({'delta': piece}, ensure_ascii=False)}\n\n"
        except errors.ShmModelError as exc:
            yield f"event: error\ndata: {json.dumps({'code': exc.code, 'message': exc.message})}\n\n"
        yield "event: done\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/chat", response_model=None)
async def chat(body: ChatRequest, api: AppStateDep) -> JSONResponse | StreamingResponse:
    if not body.question.strip():
        raise errors.BadRequest("question: only whitespace")
    return await api.admission["/chat"].run(answer, api, body)
