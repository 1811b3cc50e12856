"""Client-given text cannot forge or flood log lines."""

from __future__ import annotations

import logging

from service.core.logs import RejectionLog, clip


def test_clip_escapes_line_breaks_so_no_line_can_be_forged() -> None:
    forged = "x\n2026-01-01 00:00:00,000 ERROR slimserve: FORGED\r\u2028/ready"
    safe = clip(forged)
    assert "\n" not in safe and "\r" not in safe and "\u2028" not in safe
    assert safe.startswith("x\\x0a2026-01-01") and "\\x0d\\u2028/ready" in safe


def test_clip_cuts_long_text_and_counts_the_rest() -> None:
    assert clip("a" * 1000, 10) == "aaaaaaaaaa...(990 more characters)"
    assert clip(["not", "a", "string"]) == "['not', 'a', 'string']"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rejections_are_debug_lines_and_one_warning_per_interval(caplog) -> None:
    logger = logging.getLogger("test.rejections")
    clock = _Clock()
    log = RejectionLog(logger, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="test.rejections"):
        log.rejected(400, "POST /v2/models/m/infer", "bad shape")  # first: reported at once
        for i in range(999):
            clock.now += 0.001
            log.rejected(404 if i % 2 else 400, "POST /v2/models/x\n/infer", f"no model {i}")
        clock.now += 10
        log.rejected(413, "POST /classify", "too large")  # the interval passed: a summary
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 1001 and all("\n" not in r.getMessage() for r in debug)
    assert len(warnings) == 2
    assert warnings[0].getMessage().startswith("refused 1 request (400: 1)")
    summary = warnings[1].getMessage()
    assert summary.startswith("refused 1000 requests (400: 500, 404: 499, 413: 1)")
    assert summary.endswith("latest: 413 POST /classify: too large")


def test_flush_writes_what_is_pending_and_nothing_when_idle(caplog) -> None:
    logger = logging.getLogger("test.rejections.flush")
    clock = _Clock()
    log = RejectionLog(logger, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.rejections.flush"):
        log.rejected(400, "a", "b")
        log.rejected(400, "a", "c")
        log.flush()
        log.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "refused 1 request (400: 1); latest: 400 a: b",
        "refused 1 request (400: 1); latest: 400 a: c",
    ]
