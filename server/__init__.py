"""bastion-registry's server: the aiohttp application, configuration and the ``bastion`` CLI."""

from .app import make_app
from .config import Config, ConfigError, load_config

__all__ = ["make_app", "Config", "ConfigError", "load_config"]
