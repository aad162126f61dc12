"""The application's state, typed: what every route shares, held in ``app.state.api`` and handed
to the routes by the ``AppStateDep`` dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Request

from api.guards import Admission
from api.settings import Settings
from api.tokens import load_tokenizer
from shm_model.manager import ModelManager
from tablerag.chunking import terms
from tablerag.jobs import Jobs
from tablerag.retrieval import Retriever
from tablerag.store import Store, open_store

#: Tokenizers kept at once (one per served model's folder).
MAX_TOKENIZERS = 8


@dataclass(kw_only=True)
class AppState:
    """The settings and each route's admission, from ``create_app``; the model manager and the
    ingestion jobs, from the app's start (``lifespan``); the store, its retriever and the served
    model's tokenizer, opened on first use."""

    settings: Settings
    admission: dict[str, Admission]
    manager: ModelManager = field(init=False, repr=False)
    jobs: Jobs = field(init=False, repr=False)
    opened_store: Store | None = field(default=None, init=False, repr=False)
    cached_retriever: Retriever | None = field(default=None, init=False, repr=False)
    tokenizers: dict[str, Any] = field(default_factory=dict, init=False, repr=False)  # by model folder

    def model(self) -> Any:
        return self.manager.get_model()

    def served(self) -> dict[str, Any]:
        return self.model().describe()

    def store(self) -> Store:
        if self.opened_store is None:
            self.opened_store = open_store(self.settings.db)
        return self.opened_store

    def retriever(self) -> Retriever:
        current = self.model()
        cached = self.cached_retriever
        if cached is None or cached.store is not self.store():
            cached = self.cached_retriever = Retriever(self.store(), current)
        return cached

    def tokenizer(self, info: dict[str, Any]) -> Any:
        """A served model's tokenizer (``tokenizer.json`` in its folder), loaded once per folder."""
        folder = str(info.get("model_path") or "")
        if folder not in self.tokenizers:
            if len(self.tokenizers) >= MAX_TOKENIZERS:
                self.tokenizers.clear()  # the host was reloaded with other models
            self.tokenizers[folder] = load_tokenizer(folder)
        return self.tokenizers[folder]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    api: AppState = app.state.api
    api.manager = ModelManager.get_instance()
    api.jobs = Jobs(api.settings)
    # The Korean tokenizer loads on first use (seconds, holding the GIL): load it before serving.
    await anyio.to_thread.run_sync(terms, "준비")
    yield
    api.jobs.stop()
    if api.opened_store is not None:
        api.opened_store.close()


async def app_state(request: Request) -> AppState:
    """The app's state (a coroutine: it runs on the event loop, not in a worker thread)."""
    state: AppState = request.app.state.api
    return state


#: A route's parameter of this type receives the app's state.
AppStateDep = Annotated[AppState, Depends(app_state)]
