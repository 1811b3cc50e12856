"""The benchmark's server processes: whatever happens while one starts, none is left running."""

from __future__ import annotations

import pytest


def test_a_server_whose_start_fails_unexpectedly_is_stopped(tmp_path, monkeypatch) -> None:
    """Whatever escapes the wait for readiness (here an error from the HTTP client), the
    process started is stopped, not left running."""
    import sys

    import httpx

    from loadtest.serving.servers import ServerProcess, free_port

    def boom(*args, **kwargs):
        raise ValueError("unexpected")

    monkeypatch.setattr(httpx.Client, "get", boom)
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = ServerProcess("sleeper", None, cmd, {}, free_port(), tmp_path / "log")
    with pytest.raises(ValueError, match="unexpected"):
        server.start(timeout_s=10)
    assert server.process is not None and server.process.poll() is not None  # stopped
    assert server.left_behind == []
