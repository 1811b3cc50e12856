"""Log lines that no client can flood or forge.

Client-given text (a model name from the URL, an input name, a header) goes into a log line
only through :func:`clip`: control characters escaped (an encoded newline cannot start a forged
line) and cut to a few hundred characters. Rejected requests go through
:class:`RejectionLog`: one DEBUG line each, and at most one WARNING line per interval that
sums up what was refused since the last one, so a fuzzer or an overload writes a few lines a
minute, not one per request.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["MAX_CLIENT_TEXT", "clip", "RejectionLog"]

#: the most characters of client-given text a log line carries
MAX_CLIENT_TEXT = 200

# C0 controls, DEL, C1's NEL and the Unicode line and paragraph separators: everything a
# terminal or a log shipper may treat as the end of a line
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 127, 0x85]} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def clip(value: object, limit: int = MAX_CLIENT_TEXT) -> str:
    """``value`` as one safe piece of a log line: at most ``limit`` characters (the rest
    counted, not shown), control characters escaped."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text) - limit} more characters)"
    return text.translate(_ESCAPES)


class RejectionLog:
    """Requests refused for the client's sake (4xx) or the server's (503): each one at DEBUG,
    and a WARNING at most once per ``interval_s`` counting them by status, with the latest."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._counts: Counter[int] = Counter()
        self._latest = ""
        self._since = -float("inf")  # the first rejection is reported at once

    def rejected(self, status: int, where: str, message: str) -> None:
        """Count one refused request; ``where`` and ``message`` may hold client text."""
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("%d %s: %s", status, clip(where), clip(message))
        self._counts[status] += 1
        self._latest = f"{status} {clip(where)}: {clip(message)}"
        now = self._clock()
        if now - self._since >= self.interval_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Write the summary of what was counted since the last one (nothing when none)."""
        now = self._clock() if now is None else now
        if self._counts:
            total = sum(self._counts.values())
            by_status = ", ".join(f"{s}: {n}" for s, n in sorted(self._counts.items()))
            self.logger.warning(
                "refused %d request%s (%s); latest: %s",
                total,
                "" if total == 1 else "s",
                by_status,
                self._latest,
            )
            self._counts.clear()
        self._since = now
