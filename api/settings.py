"""The API server's settings: ``config.api_config`` plus the chat endpoint they describe."""

from __future__ import annotations

from dataclasses import dataclass

from config import settings as config_settings
from config.api_config import ApiConfig
from tablerag.answers import ChatEndpoint


@dataclass(frozen=True, kw_only=True)
class Settings(ApiConfig):
    """The API server's settings (``config.api_config``; the variables are in ``config.settings``)."""

    def chat_endpoint(self) -> ChatEndpoint:
        return ChatEndpoint(base=self.chat_base, model=self.chat_model, key=self.chat_key, timeout=self.chat_timeout)


def settings_help() -> str:
    """The environment variables the API server reads, for ``shm-model-api --help``."""
    return config_settings.settings_help(("api", "logs", "manager", "model"))
