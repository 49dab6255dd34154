"""Regenerate the Python modules of every ``.proto`` in this folder.

Usage (from the repository root)::

    python -m protos.generate            # rewrite protos/*_pb2*.py(i)
    python -m protos.generate --check    # exit 1 if the checked-in files are stale

Compiling with ``-I <repo root>`` makes ``import "protos/x.proto"`` generate
``from protos import x_pb2``, so no import rewriting is needed.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_sources() -> list[Path]:
    """Every ``.proto`` file of the package, sorted by name."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Compile every proto into ``out_root/protos``; return the files written."""
    from grpc_tools import protoc  # build-time dependency only

    sources = [str(p.relative_to(REPO_ROOT)) for p in proto_sources()]
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    written = [
        p
        for p in sorted((out_root / "protos").iterdir())
        if p.name.endswith(GENERATED_SUFFIXES)
    ]
    # protoc emits an empty *_pb2_grpc.py for protos without services; drop them.
    for p in list(written):
        if p.name.endswith("_pb2_grpc.py") and "class " not in p.read_text():
            p.unlink()
            written.remove(p)
    return written


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing beside) the sources."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        current = {p.name: p for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        names = sorted(set(fresh) | set(current))
        return [
            n
            for n in names
            if n not in fresh
            or n not in current
            or not filecmp.cmp(fresh[n], current[n], shallow=False)
        ]


def locked_tools_version() -> str | None:
    """The grpcio-tools version pinned in ``requirements/dev.txt`` (None if absent)."""
    lock = REPO_ROOT / "requirements" / "dev.txt"
    if not lock.exists():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith("grpcio-tools=="):
            return line.split("==", 1)[1].split()[0]
    return None


def tools_version_mismatch() -> str | None:
    """Why a drift report may be the tool's fault, not the sources' (None if versions agree).

    The generated files carry the generator's version, so only the locked grpcio-tools
    reproduces the checked-in bytes; any other version reports every file as stale.
    """
    from importlib.metadata import PackageNotFoundError, version

    locked = locked_tools_version()
    try:
        installed = version("grpcio-tools")
    except PackageNotFoundError:
        installed = "none"
    if locked is None or installed == locked:
        return None
    return (
        f"grpcio-tools {installed} is installed but requirements/dev.txt locks {locked}: "
        "run `bash scripts/bootstrap.sh` (or install from the lock) and check again"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    mismatch = tools_version_mismatch()
    if mismatch:
        print(mismatch)
        return 1
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated protos: " + ", ".join(stale))
            print("run `python -m protos.generate`")
            return 1
        return 0
    for p in PROTO_DIR.iterdir():
        if p.name.endswith(GENERATED_SUFFIXES):
            p.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for p in generate(Path(tmp)):
            (PROTO_DIR / p.name).write_bytes(p.read_bytes())
            print(f"wrote protos/{p.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
