"""Progress for long CLI runs: a rich display on a terminal (images and bytes done, rate,
ETA), plain log lines every few seconds otherwise (CI, redirected output)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

__all__ = ["Progress"]

log = logging.getLogger("bastion.progress")

_LOG_EVERY: Final = 5.0


class Progress:
    def __init__(
        self, *, enabled: bool = True, total_images: int = 0, tty: bool | None = None
    ) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.images_total = total_images
        self.images_done = 0
        self.bytes_total = 0
        self.bytes_done = 0
        self._started = time.monotonic()
        self._last_log = 0.0
        self._rich: Any = None
        self._image_task: Any = None
        self._byte_task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled and self.tty:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self._rich.start()
            self._image_task = self._rich.add_task("images", total=self.images_total or None)
            self._byte_task = self._rich.add_task("bytes", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def set_total_images(self, n: int) -> None:
        self.images_total = n
        if self._rich is not None:
            self._rich.update(self._image_task, total=n)

    def planned(self, job: Any) -> None:
        self._tick()

    def start_bytes(self, total: int) -> None:
        self.bytes_total = total
        if self._rich is not None:
            self._rich.update(self._byte_task, total=total)
        elif self.enabled:
            log.info("fetching %.1f MiB of blobs not yet in the store", total / 2**20)

    def advance_bytes(self, n: int) -> None:
        self.bytes_done += n
        if self._rich is not None:
            self._rich.update(self._byte_task, advance=n)
        self._tick()

    def image_done(self, job: Any) -> None:
        self.images_done += 1
        if self._rich is not None:
            self._rich.update(self._image_task, advance=1)
        self._tick()

    def _tick(self) -> None:
        if not self.enabled or self._rich is not None:
            return
        now = time.monotonic()
        if now - self._last_log < _LOG_EVERY:
            return
        self._last_log = now
        elapsed = max(now - self._started, 1e-6)
        rate = self.bytes_done / elapsed
        eta = (self.bytes_total - self.bytes_done) / rate if rate > 0 else float("nan")
        log.info(
            "images %d/%d, %.1f/%.1f MiB, %.1f MiB/s, ETA %s",
            self.images_done,
            self.images_total,
            self.bytes_done / 2**20,
            self.bytes_total / 2**20,
            rate / 2**20,
            "?" if eta != eta else f"{eta:.0f}s",
        )
