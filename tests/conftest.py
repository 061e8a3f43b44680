"""Shared fixtures: a real ``gmtrouter serve`` process on a free port, and gRPC clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gmtrouter.v1 import router_pb2_grpc

pytest_plugins = ["tests.neo4j_fixtures"]

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def _merge(base: Mapping[str, object], over: Mapping[str, object]) -> dict[str, object]:
    """``over`` merged into ``base``, nested mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        out[k] = _merge(b, v) if isinstance(b, Mapping) and isinstance(v, Mapping) else v
    return out


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``gmtrouter serve`` in a subprocess, talking over a real socket.

    Args:
        config: Settings mapping written to a YAML file and passed with ``--config``.
        store: ``--store`` URI.
        workdir: Folder for the config file and the log.
    """

    def __init__(
        self, workdir: Path, store: str, config: Mapping[str, object] | None = None
    ) -> None:
        self.workdir = workdir
        self.store = store
        self.config = dict(config or {})
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"server-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        cfg = self.workdir / f"config-{self.port}.yaml"
        defaults: dict[str, object] = {
            "logging": {"format": "json"},
            "server": {"metrics_port": 0},  # tests run several servers at once
        }
        cfg.write_text(yaml.safe_dump(_merge(defaults, self.config)))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--config",
                str(cfg),
                "--store",
                self.store,
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            # A new channel per attempt: the port is bound only once the server is ready, and
            # a channel whose connections were refused waits out grpc's reconnect backoff
            # (seconds) before it tries again.
            with grpc.insecure_channel(self.address) as ch:
                try:
                    resp = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0
                    )
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server not SERVING after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send ``sig`` and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One embedded-store server per test module."""
    work = tmp_path_factory.mktemp("server")
    srv = ServerProcess(work, f"sqlite:///{work}/graph.db").start()
    yield srv
    srv.stop()


@pytest.fixture()
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture()
def stub(channel: grpc.Channel) -> router_pb2_grpc.RouterServiceStub:
    return router_pb2_grpc.RouterServiceStub(channel)
