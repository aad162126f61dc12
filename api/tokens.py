"""The embeddings routes' inputs: the served model's names, its tokenizer (token-id inputs,
TEI's left truncation and ``/tokenize``), and the checks of a request's model, dimensions and texts."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from api.schemas import MAX_INPUT_CHARS, is_id
from shm_model import errors

if TYPE_CHECKING:
    from api.state import AppState

#: Tokens one /tokenize response lists, all inputs together (about 60 bytes of JSON each).
MAX_TOKENIZE_TOKENS = 32_768


def served_names(info: dict[str, Any]) -> set[str]:
    """Names a request may give a served model: its name (MODEL_NAME of the host: an alias, a
    hub id or a folder), that name's last part, its folder's name and the alias it was configured as."""
    names = {str(info.get("model") or ""), str(info.get("alias") or "")}
    names.add(os.path.basename(str(info.get("model") or "").rstrip("/")))
    names.add(os.path.basename(str(info.get("model_path") or "").rstrip("/")))
    return names - {""}


def served_models(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model the host serves (``info["models"]``; the first is the default)."""
    return list(info.get("models") or [info])


def served_model(name: str | None, info: dict[str, Any]) -> dict[str, Any]:
    """The served model a request names (None: the default); an unknown name is ModelNotFound."""
    models = served_models(info)
    if name is None:
        return models[0]
    for model in models:
        if name in served_names(model):
            return model
    served = ", ".join(repr(str(m.get("model"))) for m in models)
    raise errors.ModelNotFound(
        f"the model {name[:80]!r} is not served here; this server serves {served}", param="model"
    )


def load_tokenizer(folder: str) -> Any:
    """The ``tokenizers`` tokenizer of a model folder, without its own truncation or padding."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not folder or not os.path.isfile(path):
        raise errors.BadRequest(f"token ids need the model's tokenizer.json; there is none in {folder or '(none)'}")
    loaded = Tokenizer.from_file(path)
    loaded.no_truncation()
    loaded.no_padding()
    return loaded


def decode_ids(tokenizer: Any, arrays: list[list[int]], name: str) -> list[str]:
    """Token-id inputs as texts (special tokens dropped: the model adds its own), each id checked
    against the vocabulary and each text against the input bound."""
    vocabulary = tokenizer.get_vocab_size(with_added_tokens=True)
    for i, ids in enumerate(arrays):
        if not ids:
            raise errors.BadRequest(f"{name}[{i}] is an empty token array", param=name)
        bad = next((t for t in ids if not 0 <= t < vocabulary), None)
        if bad is not None:
            raise errors.BadRequest(
                f"{name}[{i}] has the token id {bad}, outside the model's vocabulary (0 to {vocabulary - 1})",
                param=name,
            )
    texts = tokenizer.decode_batch(arrays, skip_special_tokens=True)
    for i, text in enumerate(texts):
        if len(text) > MAX_INPUT_CHARS:
            raise errors.BadRequest(f"{name}[{i}] decodes to {len(text)} characters; at most {MAX_INPUT_CHARS}")
    return texts


def keep_last_tokens(tokenizer: Any, text: str, prompt: str, limit: int) -> str:
    """``text`` without its first tokens, so that with ``prompt`` and the special tokens it fits in
    ``limit`` tokens (TEI's truncation_direction=Left); the host then cuts any token that the
    re-tokenized start of the text adds."""
    encoding = tokenizer.encode(text)
    content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    room = limit - (len(encoding.ids) - len(content))
    if prompt:
        room -= len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    if len(content) <= room:
        return text
    if room < 1:
        raise errors.BadRequest(f"the prompt takes the model's whole length of {limit} tokens")
    return text[encoding.offsets[content[len(content) - room]][0] :]


def tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[dict[str, Any]]]:
    """TEI's /tokenize answer: each text's tokens with their id, text, whether special, and their
    character span in the text (null for a special token)."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    total = sum(len(e.ids) for e in encodings)
    if total > MAX_TOKENIZE_TOKENS:
        raise errors.PayloadTooLarge(f"the inputs have {total} tokens; /tokenize lists at most {MAX_TOKENIZE_TOKENS}")
    out = []
    for text, encoding in zip(texts, encodings, strict=True):
        tokens = []
        for token_id, token, special, (start, stop) in zip(
            encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets, strict=True
        ):
            if special:
                tokens.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
            else:
                span = {"start": start, "stop": stop}
                tokens.append({"id": token_id, "text": text[start:stop], "special": False, **span})
        out.append(tokens)
    return out


def check_dimensions(dimensions: int | None, info: dict[str, Any]) -> int | None:
    dimension = int(info.get("dimension") or 0)
    if dimensions is not None and dimensions > dimension:
        raise errors.BadRequest(
            f"dimensions={dimensions} is more than the dimension of {info.get('model')!r}, {dimension}",
            param="dimensions",
        )
    return dimensions


def texts_of(api: AppState, items: Any, name: str, info: dict[str, Any]) -> list[str]:
    """The texts of an input: strings as they are, token ids decoded by the model's tokenizer."""
    if isinstance(items, str):
        items = [items]
    if not items:
        raise errors.BadRequest(f"{name} must not be empty", param=name)
    if is_id(items[0]):
        items = [items]
    if isinstance(items[0], list):
        items = decode_ids(api.tokenizer(info), items, name)
    for i, text in enumerate(items):
        if not text:
            raise errors.BadRequest(f"{name}[{i}] is an empty string", param=name)
    return items
