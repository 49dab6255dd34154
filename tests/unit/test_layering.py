"""The engine is pure numpy: nothing under ps_server/engine imports grpc or the service proto."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "ps_server" / "engine"
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


def test_wire_module_imports_no_transport() -> None:
    """protos/wire.py is shared by the engine, so it is held to the engine's rule."""
    wire = ENGINE.parents[1] / "protos" / "wire.py"
    found = sorted(
        n for n in _imports(wire) if any(n == x or n.startswith(x + ".") for x in FORBIDDEN)
    )
    assert found == []
