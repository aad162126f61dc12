"""The models one host serves: ``MODEL_NAME`` may list several (``a,b``), each loaded once
in the supervisor and shared with every worker the same way. The first is the default; a
request names another by its served name or by the name it was configured with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import ModelNotFound
from workers.backends import Backend, load_backend


class ModelSet:
    def __init__(self, backends: list[tuple[str, Backend]]) -> None:
        if not backends:
            raise ValueError("a model set needs at least one model")
        self.aliases = [alias for alias, _ in backends]
        self.backends = [backend for _, backend in backends]
        self._by_name: dict[str, Backend] = {}
        for alias, backend in backends:
            for name in (backend.name, alias):
                self._by_name.setdefault(name, backend)

    @property
    def default(self) -> Backend:
        return self.backends[0]

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self.backends)

    def get(self, name: str | None) -> Backend:
        """The model a request named (None: the default)."""
        if name is None:
            return self.default
        try:
            return self._by_name[name]
        except KeyError:
            served = ", ".join(b.name for b in self.backends)
            raise ModelNotFound(f"model {name!r:.200} is not served here; served: {served}", model=name) from None

    def prepare_worker(self, threads: int) -> None:
        for backend in self.backends:
            backend.prepare_worker(threads)

    def set_threads(self, threads: int) -> None:
        for backend in self.backends:
            backend.set_threads(threads)

    def set_gate(self, gate: Callable[[], None]) -> None:
        for backend in self.backends:
            backend.set_gate(gate)

    @property
    def weight_bytes(self) -> int:
        return sum(b.weight_bytes for b in self.backends)

    def describe(self) -> dict[str, Any]:
        """The default model's description, and ``models``: every model's, with the name it was
        configured with as ``alias``."""
        models = [{**b.describe(), "alias": alias} for alias, b in zip(self.aliases, self.backends, strict=True)]
        return {**models[0], "weight_bytes": self.weight_bytes, "models": models}


def load_models(model_cfg: ModelConfig, host_cfg: HostConfig, *, place: bool = True) -> ModelSet:
    """Load every model ``MODEL_NAME`` lists, in its order."""
    return ModelSet(
        [
            (name, load_backend(dataclasses.replace(model_cfg, name=name), host_cfg, place=place))
            for name in model_cfg.names
        ]
    )
