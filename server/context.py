"""Typed application state shared by the handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from storage import Store

from .config import Config

if TYPE_CHECKING:
    from .proxy import Proxy

__all__ = ["CONFIG", "STORE", "PROXY", "store_of"]

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy")


def store_of(request: web.Request) -> Store:
    return request.app[STORE]
