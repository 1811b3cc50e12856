"""The peers' virtual environments: made once, remade when their pins change, cleaned up when
pip fails; and each peer's command runs in its own venv, never the project's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.serving import peers
from service.core.repository import ModelRepository
from tests.conftest import publish_identity


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``_run`` recorded, with venv creation faked as a bin/python file."""
    calls: list[list[str]] = []

    def run(cmd: list[str], what: str) -> None:
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").write_text("")
        if "broken==0" in cmd:
            raise peers.PeerInstallError(f"{what} failed")

    monkeypatch.setattr(peers, "_run", run)
    return calls


def test_a_venv_is_made_once_and_again_when_its_pins_change(fake_pip, tmp_path, monkeypatch):
    python = peers.ensure_venv(peers.KSERVE, tmp_path)
    assert python == tmp_path / "kserve" / "bin" / "python" and len(fake_pip) == 2
    assert fake_pip[1][-len(peers.PEER_PINS[peers.KSERVE]) :] == peers.PEER_PINS[peers.KSERVE]
    peers.ensure_venv(peers.KSERVE, tmp_path)
    assert len(fake_pip) == 2  # the stamp matched: nothing run
    monkeypatch.setitem(peers.PEER_PINS, peers.KSERVE, ["kserve==9.9.9"])
    peers.ensure_venv(peers.KSERVE, tmp_path)
    assert len(fake_pip) == 4 and fake_pip[3][-1] == "kserve==9.9.9"


def test_a_failed_install_leaves_no_half_made_venv(fake_pip, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(peers.PEER_PINS, peers.MLSERVER, ["broken==0"])
    with pytest.raises(peers.PeerInstallError):
        peers.ensure_venv(peers.MLSERVER, tmp_path)
    assert not (tmp_path / "mlserver").exists()
    with pytest.raises(ValueError, match="unknown peer"):
        peers.ensure_venv("triton-core", tmp_path)


@pytest.mark.parametrize("kind", peers.PEERS)
def test_each_peer_runs_from_its_own_venv_on_loopback(kind, tmp_path, monkeypatch) -> None:
    venv_python = tmp_path / "venvs" / kind / "bin" / "python"
    monkeypatch.setattr(peers, "ensure_venv", lambda peer, root=None: venv_python)
    repo = ModelRepository(tmp_path / "models")
    publish_identity(repo, "alpha")
    server = peers.peer(kind, repo.root, "alpha", tmp_path, tmp_path / "log")
    assert server.kind == kind and server.model == "alpha"
    assert Path(server.command[0]).parent == venv_python.parent
    assert server.env["VIRTUAL_ENV"] == str(venv_python.parent.parent)
    assert server.env["PATH"].startswith(str(venv_python.parent))
    assert server.ready_path == "/v2/models/alpha/ready"
    if kind == peers.MLSERVER:
        [folder] = tmp_path.glob("mlserver-alpha-*")
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["host"] == "127.0.0.1" and settings["http_port"] == server.port
        assert len({settings[k] for k in ("http_port", "grpc_port", "metrics_port")}) == 3
        model = json.loads((folder / "alpha" / "model-settings.json").read_text())
        assert model["parameters"]["uri"].endswith(".onnx")
    else:
        assert server.command[server.command.index("--port") + 1] == str(server.port)
    with pytest.raises(ValueError, match="not a peer"):
        peers.peer("fastapi", repo.root, "alpha", tmp_path, tmp_path / "log")
