"""Request bodies, with their inputs bounded by count, kind and size before pydantic walks them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from tablerag.retrieval import Mode

#: Inputs of one /v1/embeddings or /embed request, and characters of each (infinity's 122,880).
MAX_INPUTS = 1024
MAX_INPUT_CHARS = 122_880
#: Token ids of one token-array input (OpenAI's limit per input).
MAX_INPUT_TOKENS = 8192
#: Results of one /search and one /chat.
MAX_SEARCH_K = 50
MAX_CHAT_K = 20

#: Texts, or token ids of the served model's tokenizer (one array, or one per input).
Inputs = str | list[str] | list[int] | list[list[int]]


def is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(items: Any, name: str) -> None:
    """Counts, kinds and sizes of an input before pydantic walks it: one short error, never one per
    item. Strings, token ids, or lists of token ids, all of one kind."""
    if isinstance(items, str):
        if len(items) > MAX_INPUT_CHARS:
            raise ValueError(f"{name} has {len(items)} characters; at most {MAX_INPUT_CHARS}")
        return
    if not isinstance(items, list):
        return  # pydantic names the type
    if items and is_id(items[0]):
        if len(items) > MAX_INPUT_TOKENS:
            raise ValueError(f"{name} has {len(items)} token ids; at most {MAX_INPUT_TOKENS}")
        kind = "token ids"
    elif len(items) > MAX_INPUTS:
        raise ValueError(f"{name} has {len(items)} items; at most {MAX_INPUTS}")
    else:
        kind = "lists of token ids" if items and isinstance(items[0], list) else "strings"
    for i, item in enumerate(items):
        if kind == "strings" and isinstance(item, str):
            if len(item) > MAX_INPUT_CHARS:
                raise ValueError(f"{name}[{i}] has {len(item)} characters; at most {MAX_INPUT_CHARS}")
        elif kind == "lists of token ids" and isinstance(item, list):
            if len(item) > MAX_INPUT_TOKENS:
                raise ValueError(f"{name}[{i}] has {len(item)} token ids; at most {MAX_INPUT_TOKENS}")
            if not all(is_id(t) for t in item):
                raise ValueError(f"{name}[{i}] is a list that is not all integer token ids")
        elif not (kind == "token ids" and is_id(item)):
            raise ValueError(
                f"{name}[{i}] is a {type(item).__name__}, but {name}[0] makes {name} {kind}; "
                "give strings, token ids, or lists of token ids"
            )


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; ``input`` may be token ids of the served model's tokenizer."""

    input: Inputs
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_inputs(data.get("input"), "input")
        return data


class EmbedRequest(BaseModel):
    """TEI's ``POST /embed``. ``truncate`` null is TEI's default without ``--auto-truncate``: an
    input over the model's length is refused (413), not cut."""

    inputs: Inputs
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: str | None = None
    dimensions: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_inputs(data.get("inputs"), "inputs")
        return data


class TokenizeRequest(BaseModel):
    """TEI's ``POST /tokenize``."""

    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_inputs(data.get("inputs"), "inputs")
        return data


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=MAX_SEARCH_K)
    mode: Mode = "hybrid"


class ChatRequest(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=MAX_CHAT_K)
    mode: Mode = "hybrid"
    stream: bool = False
