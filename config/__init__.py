"""Configuration of shm-model, read from the environment by explicit ``load()`` calls."""

from config.model_config import HostConfig, ManagerConfig, ModelConfig, Setting, settings_help

__all__ = ["HostConfig", "ManagerConfig", "ModelConfig", "Setting", "settings_help"]
