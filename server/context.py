"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from storage import Store

from .config import Config

__all__ = ["CONFIG", "STORE", "store_of"]

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)


def store_of(request: web.Request) -> Store:
    return request.app[STORE]
