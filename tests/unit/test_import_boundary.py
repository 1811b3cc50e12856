"""The rooms and the arrows between them (STYLE.md: the two halves; README: Layout).

Two checks. The first reads every module's ``import`` statements (top level and inside
functions alike, so a lazy import is an arrow too) and holds them to ``ARROWS``: which of the
project's rooms a room may import. The second imports the modules that must stay light and
looks at ``sys.modules``: the serving side never pulls in torch or scikit-learn, the scikit-learn
zoo never pulls in torch, the Locust file pulls in nothing of the project. A module whose
optional extra is not installed (ray, pyarrow, locust, ...) is skipped there, not failed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("service", "export", "loadtest")

#: room -> the rooms it may import (its own always). The longest matching room name wins.
#: The contract (service.core) leans on nothing; the engine on the contract; transports on both;
#: batch jobs and the factory only on the contract; load generators speak HTTP and read the
#: contract's repository to set up what they measure.
ARROWS: dict[str, set[str]] = {
    "service.core": set(),
    "service.serving": {"service.core"},
    # the BentoML service (service.http.bento) starts the gRPC listener beside HTTP
    "service.http": {"service.core", "service.serving", "service.grpc"},
    "service.grpc": {"service.core", "service.serving"},
    "service.server": {"service.core", "service.serving", "service.http"},
    # the Ray Serve application: a replica serves the worker's ASGI app over its own dataplane
    "service.rayserve": {"service.core", "service.serving", "service.http"},
    "service.batch": {"service.core"},
    "service": {"service.core", "service.http", "service.server"},  # __main__.py, service.py
    "export": {"service.core"},
    "loadtest": set(),  # loadtest/__init__.py
    "loadtest.locustfile": set(),
    "loadtest.baselines": set(),
    "loadtest.samples": {"export.data"},  # only to rewrite samples.npz from the datasets
    "loadtest.texts": {"export.corpora"},  # only to rewrite texts.json.gz from the corpora
    "loadtest.serving": {
        "loadtest.samples",
        "loadtest.texts",
        "service.core",
        "export.compress",
        "export.corpora",  # make bench-text scores every 20 Newsgroups test post served
    },
    "loadtest.bench_batch": {"service.core", "service.batch", "export.data"},
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = sorted(_module_name(p) for room in FIRST_PARTY for p in (ROOT / room).rglob("*.py"))


def _room(module: str) -> str:
    """The longest ``ARROWS`` key that is ``module`` or a package above it."""
    rooms = [r for r in ARROWS if module == r or module.startswith(r + ".")]
    if not rooms:
        raise AssertionError(f"{module} is in no room: add its room to ARROWS")
    return max(rooms, key=len)


def _imports(module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every first-party import in ``module``'s source."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # `from loadtest import samples` imports the module loadtest.samples
            found += [
                (node.lineno, f"{name}.{a.name}" if f"{name}.{a.name}" in MODULES else name)
                for a in node.names
            ]
    return [(line, name) for line, name in found if name.split(".")[0] in FIRST_PARTY]


def _allowed(importer: str, imported: str) -> bool:
    """The room of ``imported`` is ``importer``'s own or one it may import (rooms compared
    whole: ``service`` may not reach ``service.serving`` by being its prefix)."""
    room = _room(importer)
    if _room(imported) == room:
        return True
    return any(imported == t or imported.startswith(t + ".") for t in ARROWS[room])


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_only_the_rooms_its_room_may(module: str) -> None:
    bad = [f"line {line}: {name}" for line, name in _imports(module) if not _allowed(module, name)]
    room = _room(module)
    assert not bad, (
        f"{module} (room {room}) may import {sorted(ARROWS[room]) or 'nothing of the project'}"
        f" besides itself, but imports {', '.join(bad)}"
    )


def test_the_arrow_checker_sees_lazy_and_relative_imports() -> None:
    assert "service.core.datatypes" in {name for _, name in _imports("service.http.friendly")}
    assert "export.compress" in {name for _, name in _imports("loadtest.serving.servers")}
    assert not _allowed("service.core.protocol", "service.serving.store")
    assert not _allowed("service.serving.dataplane", "service.http.v2")
    assert not _allowed("export.sklearn_zoo", "service.serving.store")
    assert _allowed("export.build", "service.core.repository")
    assert not _allowed("loadtest.locustfile", "export.data")
    assert not _allowed("service.service", "service.serving.store")  # a prefix is no room
    assert _allowed("service.server.worker", "service.serving.metrics")


#: module prefix -> what importing it must never pull in
LIGHT: dict[str, tuple[str, ...]] = {
    "service": (
        "torch",
        "sklearn",
        "skl2onnx",
        "onnxscript",
        "transformers",
        "sentence_transformers",
    ),
    "export.sklearn_zoo": ("torch",),
    "export.data": ("torch",),
    "loadtest.locustfile": ("torch", "sklearn", "service", "export"),
}
LIGHT_MODULES = sorted(
    (m, heavy)
    for m in MODULES
    for prefix, heavy in LIGHT.items()
    if m == prefix or m.startswith(prefix + ".")
)


@pytest.mark.parametrize(("module", "heavy"), LIGHT_MODULES, ids=[m for m, _ in LIGHT_MODULES])
def test_light_module_does_not_pull_in_heavy_libraries(module: str, heavy: tuple[str, ...]) -> None:
    code = (
        "import sys\n"
        "try:\n"
        f"    import {module}\n"
        "except ModuleNotFoundError as exc:\n"
        f"    if (exc.name or '').split('.')[0] in {FIRST_PARTY!r}:\n"
        "        raise\n"
        "    print('MISSING', exc.name)\n"
        "    sys.exit(0)\n"
        f"bad = sorted(m for m in {heavy!r} if m in sys.modules)\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    if out.stdout.startswith("MISSING "):
        pytest.skip(f"{module} needs {out.stdout.split()[1]}, an optional extra not installed")
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_the_serving_install_lists_no_training_library() -> None:
    """``pip install 'slimserve[serve]'`` (and the Bento): no torch, transformers,
    sentence-transformers or scikit-learn; text models need only ``tokenizers``."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = project["optional-dependencies"]["serve"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in serve}
    heavy = {"torch", "transformers", "sentence-transformers", "scikit-learn", "onnxscript"}
    assert not names & heavy
    assert "tokenizers" in names
    assert {"hpack", "grpcio", "tritonclient"} <= names  # the v2 gRPC service is part of the server
    core = {req.split(">")[0].split("=")[0].strip().lower() for req in project["dependencies"]}
    assert not core & heavy
