"""The run's progress bar: images done, images/s, ETA, failures and the actors that are up,
through tqdm.

tqdm redraws one line on a terminal, shows a widget in a notebook (``tqdm.auto``), and in a log
(no terminal) we print a line per 10% so scheduled jobs' logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

__all__ = ["Progress"]


class Progress:
    """Images done out of ``total``, with failures; disabled, it only keeps the rate."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.t0 = time.perf_counter()
        stream = stream or sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self._tty = tty
        self._bar = tqdm(
            total=total,
            desc="audit",
            unit="img",
            file=stream,
            disable=not enabled,
            # in a log, redraw only every 10% of the images
            miniters=1 if tty else max(1, total // 10),
            mininterval=0.5 if tty else 0.0,
            dynamic_ncols=tty,
        )
        self._actors = ""
        self._bar.set_postfix(failures=0, refresh=False)

    def restart_clock(self) -> None:
        """Count the rate from now (the first actor is up: start-up is not compute)."""
        self.t0 = time.perf_counter()

    def rate(self) -> float:
        """Images per second so far."""
        elapsed = time.perf_counter() - self.t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, images: int, failed: int = 0) -> None:
        """Count ``images`` more images done, ``failed`` of them with errors."""
        self.done += images
        self.failed += failed
        self._postfix()
        self._bar.update(images)

    def tick(self, actors_up: int | None = None, actors: int | None = None) -> None:
        """Show ``actors_up`` of ``actors`` when given, and redraw the elapsed time and rate
        while nothing finishes (tqdm rate-limits it)."""
        if actors is not None:
            now = f"{actors_up}/{actors}"
            if now != self._actors:
                self._actors = now
                self._postfix()
                if not self._tty:  # a log gets a line when the pool grows or shrinks
                    self._bar.refresh()
        if self._tty:
            self._bar.refresh()

    def _postfix(self) -> None:
        shown: dict[str, object] = {"failures": self.failed}
        if self._actors:
            shown["actors"] = self._actors
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()
