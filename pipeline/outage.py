"""A Redis outage, as one process's log tells it: one line when it starts, one when it ends.

Every request or loop that meets the outage notes it, but only the first is logged; the line
at its end says how long it lasted and, where the failures are worth counting (the web's
requests), how many there were. Both processes keep one per process (per hypercorn worker).
"""

from __future__ import annotations

import logging
import time


class Outage:
    """Whether Redis answers. ``failed`` notes a failure (logged if it starts an outage),
    ``ok`` a success (logged if it ends one); ``ok`` outside an outage costs one comparison,
    so it may sit on a hot path."""

    def __init__(
        self, logger: logging.Logger, meanwhile: str, *, resuming: str, counted: str | None = None
    ) -> None:
        self._logger = logger
        self._meanwhile = meanwhile
        self._resuming = resuming
        self._counted = counted
        self.down_since: float | None = None
        self.back_at: float | None = None
        #: Failures noted since the outage began.
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            self._logger.warning("Redis unavailable (%s); %s", exc, self._meanwhile)

    def ok(self) -> None:
        if self.down_since is None:
            return
        seconds = time.monotonic() - self.down_since
        if self._counted is None:
            self._logger.warning("Redis available again after %.1f s; %s", seconds, self._resuming)
        else:
            self._logger.warning(
                "Redis available again after %.1f s; %d %s meanwhile; %s",
                seconds,
                self.failures,
                self._counted,
                self._resuming,
            )
        self.down_since = None
        self.failures = 0
        self.back_at = time.monotonic()

    def quiet_for(self, seconds: float) -> bool:
        """True unless Redis came back from an outage less than ``seconds`` ago."""
        return self.back_at is None or time.monotonic() - self.back_at >= seconds
