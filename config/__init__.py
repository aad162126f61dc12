"""Configuration of shm-model, read from the environment by explicit ``load()`` calls."""

from config.model_config import HostConfig, ModelConfig, Setting, settings_help

__all__ = ["HostConfig", "ModelConfig", "Setting", "settings_help"]
