"""The layers of docs/architecture.md, checked on the imports of each module.

engine (pure numpy) <- runtime (no gRPC, no service protos) <- thin servicers (reach
the engine only through the runtime and ``Shard``) ; the client never imports the server.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "ps_server" / "engine"
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "protos.ps_service_pb2", "ps_client")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_engine_imports_no_transport() -> None:
    files = sorted(ENGINE.rglob("*.py"))
    assert files, "engine sources not found"
    offenders = {
        str(f.relative_to(ENGINE)): sorted(
            n for n in _imports(f) if any(n == x or n.startswith(x + ".") for x in FORBIDDEN)
        )
        for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        n for n in _imports(path) if any(n == x or n.startswith(x + ".") for x in forbidden)
    )


def test_engine_imports_no_runtime_or_files() -> None:
    above = ("ps_server.runtime", "ps_server.service", "ps_server.admin", "ps_server.server",
             "ps_server.checkpoint", "ps_server.status", "ps_server.guards")
    offenders = {str(f.relative_to(ENGINE)): _offending(f, above)
                 for f in sorted(ENGINE.rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_runtime_imports_no_grpc_or_service_protos() -> None:
    assert _offending(REPO / "ps_server" / "runtime.py",
                      ("grpc", "protos.ps_service_pb2", "protos.ps_service_pb2_grpc")) == []


def test_servicers_reach_the_engine_only_through_the_runtime() -> None:
    # Engine submodules and checkpoint code are the runtime's business.
    for name in ("service.py", "admin.py"):
        path = REPO / "ps_server" / name
        assert _offending(path, ("ps_server.engine", "ps_server.checkpoint", "ps_server.locks",
                                 "ps_server.ledger", "ps_server.paths")) == [], name


def test_client_imports_no_server() -> None:
    files = sorted((REPO / "ps_client").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(REPO)): _offending(f, ("ps_server",)) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_wire_module_imports_no_transport() -> None:
    """protos/wire.py is shared by the engine, so it is held to the engine's rule."""
    wire = ENGINE.parents[1] / "protos" / "wire.py"
    found = sorted(
        n for n in _imports(wire) if any(n == x or n.startswith(x + ".") for x in FORBIDDEN)
    )
    assert found == []


def test_only_the_torch_extra_imports_torch() -> None:
    """torch is an optional extra: the core (client, server, protos, the core examples)
    imports neither torch nor ``ps_client.torch``; only ``ps_client/torch/`` and the
    examples of the extra (``examples/ddp/``, ``examples/movielens/``) do."""
    extra = REPO / "ps_client" / "torch"
    torch_examples = [REPO / "examples" / "ddp", REPO / "examples" / "movielens"]
    files = [
        f
        for root in ("ps_client", "ps_server", "protos", "examples")
        for f in sorted((REPO / root).rglob("*.py"))
        if extra not in f.parents and not any(d in f.parents for d in torch_examples)
    ]
    assert files
    offenders = {
        str(f.relative_to(REPO)): _offending(f, ("torch", "torchrec", "ps_client.torch"))
        for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any(_offending(f, ("torch",)) for f in sorted(extra.rglob("*.py")))
