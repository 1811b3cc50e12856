"""``python -m service``: bind the port, start the workers, keep them running, stop them whole.

BentoML's ``bentoml serve`` supervises its workers with circus, which listens on two
unauthenticated TCP control ports on 127.0.0.1 (any local process could make it run a
command), keeps Prometheus' multiprocess files in one folder shared by every server under the
same BentoML home, and starts workers that outlive a killed supervisor. This supervisor
exposes nothing but the server's own port:

- it binds ``SLIMSERVE_HOST:SLIMSERVE_PORT`` once and hands the socket to ``SLIMSERVE_WORKERS``
  worker processes (:mod:`service.server.worker`), which share it as circus' workers do;
- it holds ``SLIMSERVE_GRPC_PORT`` for the workers' gRPC servers, which bind it with
  ``SO_REUSEPORT`` (gRPC cannot take an inherited socket): a port some other process holds
  fails the start at once, and no other server can join the port while this one runs;
- it has no control endpoint at all: it is driven by signals (SIGTERM or SIGINT stop it);
- each server gets a private runtime folder (mode 0700) holding its own Prometheus
  multiprocess folder, created at start and removed at stop, so two servers on one machine
  never mix their metrics;
- a worker that dies is restarted (its metric files marked dead), unless workers keep dying
  (5 exits within a minute), which stops the server with an error;
- workers stay in the supervisor's process group and get SIGTERM from the kernel when the
  supervisor dies, however it dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import FrameType

from ..core.settings import Settings, get_settings

__all__ = ["Supervisor", "main", "bind", "reserve"]

log = logging.getLogger("slimserve.supervisor")

_POLL_S = 0.2
_CRASH_WINDOW_S = 60.0
_MAX_CRASHES = 5


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket every worker shares (IPv6 when ``host`` is an IPv6 address)."""
    sock = socket.create_server((host, port), family=_family(host), backlog=backlog)
    sock.set_inheritable(True)
    return sock


def reserve(host: str, port: int) -> socket.socket:
    """Hold ``port`` for the workers' gRPC servers: bound (not listening) with
    ``SO_REUSEPORT``, which they join. It must be free first: a plain bind fails on a port
    any socket holds, a listening ``SO_REUSEPORT`` one of another server included."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.bind((host, port))
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[int, subprocess.Popen[bytes]] = {}  # worker id -> process
        self._crashes: deque[float] = deque()
        self._stop_signal: int | None = None
        self.runtime: Path | None = None
        self.metrics_dir: Path | None = None

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (exit 0) or until workers keep dying (exit 1)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.runtime = Path(tempfile.mkdtemp(prefix="slimserve-"))  # 0700: this user only
        self.metrics_dir = metrics_dir = self.runtime / "prometheus"
        metrics_dir.mkdir()
        status = 0
        host, grpc_port = self.settings.host, self.settings.grpc_port
        try:
            held = reserve(host, grpc_port) if grpc_port else None
        except OSError as exc:
            log.error(
                "cannot listen for gRPC on %s:%d: %s (SLIMSERVE_GRPC_PORT picks another port, "
                "0 turns gRPC off)",
                host,
                grpc_port,
                exc,
            )
            shutil.rmtree(self.runtime, ignore_errors=True)
            return 1
        try:
            sock = bind(self.settings.host, self.settings.port, self.settings.backlog)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", self.settings.host, self.settings.port, exc)
            shutil.rmtree(self.runtime, ignore_errors=True)
            if held is not None:
                held.close()
            return 1
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "SLIMSERVE_RUNTIME_DIR": str(self.runtime),  # the repository API's shared state
            "BENTOML_DO_NOT_TRACK": "true",  # no outbound usage tracking
        }
        try:
            for worker_id in range(1, self.settings.worker_count() + 1):
                self._start(worker_id, sock, env)
            host, port = sock.getsockname()[:2]
            log.info(
                "slimserve on http://%s:%d%s: %d worker(s), supervisor pid %d, no control port",
                host,
                port,
                f" and grpc://{host}:{grpc_port}" if grpc_port else "",
                len(self.workers),
                os.getpid(),
            )
            status = self._watch(sock, env)
        finally:
            self._stop_workers()
            sock.close()
            if held is not None:
                held.close()
            shutil.rmtree(self.runtime, ignore_errors=True)
        return status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _start(self, worker_id: int, sock: socket.socket, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "service.server.worker", "--fd", str(sock.fileno())]
        cmd += ["--worker-id", str(worker_id), "--parent", str(os.getpid())]
        self.workers[worker_id] = subprocess.Popen(cmd, env=env, pass_fds=(sock.fileno(),))

    def _watch(self, sock: socket.socket, env: dict[str, str]) -> int:
        """Restart workers that die, until a stop signal or a crash loop."""
        while self._stop_signal is None:
            time.sleep(_POLL_S)
            for worker_id, process in list(self.workers.items()):
                code = process.poll()
                if code is None or self._stop_signal is not None:
                    continue
                self._forget(process.pid)
                now = time.monotonic()
                self._crashes.append(now)
                while self._crashes and now - self._crashes[0] > _CRASH_WINDOW_S:
                    self._crashes.popleft()
                if len(self._crashes) >= _MAX_CRASHES:
                    log.error(
                        "worker %d exited with %s; %d worker exits within %.0f s: stopping",
                        worker_id,
                        code,
                        len(self._crashes),
                        _CRASH_WINDOW_S,
                    )
                    return 1
                log.error("worker %d exited with %s; starting it again", worker_id, code)
                self._start(worker_id, sock, env)
        log.info("signal %d: stopping %d worker(s)", self._stop_signal, len(self.workers))
        return 0

    def _forget(self, pid: int) -> None:
        """A dead worker's live gauges stop counting (Prometheus multiprocess mode)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))

    def _stop_workers(self) -> None:
        """SIGTERM (uvicorn drains in-flight requests), SIGKILL after the grace period."""
        running = [p for p in self.workers.values() if p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.graceful_shutdown_s + 5
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time: killing it", process.pid)
                process.kill()
                process.wait()


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(Supervisor(get_settings()).run())
