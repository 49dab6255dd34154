"""docs/monolith-migration.md names only things that exist, and names all it promises.

Every ``ps_client.…`` / ``ps_server.…`` / ``protos.…`` dotted name in a code span must
import (module prefix) and resolve (attributes); every repository path in a code span
must exist, and ``path::name`` must name a function or class defined in that file;
every ``from … import …`` line of a code block must import. The guide must also cite
each Monolith symbol and test of the seed documents it maps.

The documentation is self-contained: no text file of the repository points at the
reference files kept outside it, and every relative link (and anchor) in README.md and
docs/*.md leads somewhere that exists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "monolith-migration.md"

_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(r"(?<![\w./])((?:ps_client|ps_server|protos)(?:\.[A-Za-z_]\w*)+)")
_PATH = re.compile(
    r"(?<![\w./<>-])((?:ps_client|ps_server|protos|bench|tests|scripts|deploy|docs)"
    r"/[\w./-]*\w)(?:::(\w+))?"
)
_FROM_IMPORT = re.compile(r"^\s*from\s+((?:ps_client|ps_server|protos)[\w.]*)\s+import\s+(.+)$")

# What the seed documents list for each Monolith module (symbols, then tests).
MONOLITH_SYMBOLS = [
    # gflags_utils
    "extract_help_info", "extract_flags", "extract_flags_decorator", "get_flags_parser",
    "update", "LinkDataclassToFlags", "update_by_flags",
    # graph_meta, graph_utils
    "get_meta", "add_batch_norm_into_update_ops",
    # hash_filter_ops
    "HASH_FILTER_CAPACITY", "HASH_FILTER_SPLIT_NUM", "_TIMEOUT_IN_MS", "FilterType",
    "create_hash_filter", "create_probabilistic_filter", "create_dummy_hash_filter",
    "_create_hash_filter", "create_hash_filters", "save_hash_filter", "restore_hash_filter",
    "intercept_gradient", "HashFilterCheckpointSaverListener",
    "HashFilterCheckpointRestorerListener", "MonolithHashFilterInterceptGradient",
    # hash_table_ops
    "BaseHashTable", "_HASH_TABLE_GRAPH_KEY", "fused_lookup", "fused_apply_gradient",
    "hash_table_from_config", "test_hash_table", "vocab_hash_table",
    "HashTableCheckpointSaverListener", "HashTableCheckpointRestorerListener",
    "HashTableRestorerSaverListener", "to_proto", "from_proto", "_BOOL_MAP", "as_op",
    "lookup_entry", "save_as_tensor", "register_proto_function", "extract_slot_from_entry",
]
MONOLITH_TESTS = [
    # gflags_utils_test.py
    "test_extract_help_info", "test_update", "test_extract_gflags_decorator",
    "test_link_flag", "test_link_flag_inheritance",
    # hash_filter_ops_test.py
    "test_hash_filter_basic", "test_hash_filter_save_restore",
    "test_hash_filter_save_restore_across_multiple_filters", "test_dummy_hash_filter_basic",
    "test_dummy_hash_filter_save_restore", "test_restore_not_found",
    # hash_table_ops_test.py
    "test_basic", "test_assign", "test_lookup_entry", "test_save_as_tensor", "testNameConflict",
    "test_gradients", "test_gradients_with_learning_rate_fn",
    "test_gradients_with_learning_rate_decay", "test_gradients_with_dedup",
    "test_gradients_with_different_ids", "test_gradients_with_hash_filter", "test_save_restore",
    "test_restore_from_another_table", "test_save_restore_with_feature_eviction_assign_add",
    "test_save_restore_with_feature_eviction_apply_gradients", "test_entry_ttl_zero",
    "test_entry_ttl_not_zero", "test_entry_ttl_by_slots", "test_save_restore_hook",
    "test_restore_after_save", "test_delete_save_path", "test_fused_lookup",
    "test_fused_optimize", "test_batch_softmax_optimizer", "test_extract_fid",
    "test_meta_graph_export", "test_hash_table_with_hash_filters",
    # hash_table_ops_benchmark.py
    "test_lookup", "test_lookup_multi_thread", "test_basic_optimize",
    "test_multi_threads_optimize", "test_multi_threads_optimize_with_dedup",
]


@cache
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def code_spans() -> list[str]:
    """Inline code spans outside fenced blocks."""
    return _SPAN.findall(_FENCE.sub("", guide()))


def dotted_names() -> list[str]:
    return sorted({m for span in code_spans() for m in _DOTTED.findall(span)})


def path_refs() -> list[tuple[str, str]]:
    return sorted({m for span in code_spans() for m in _PATH.findall(span)})


def resolve(dotted: str) -> Any:
    """Import the longest module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    module: ModuleType | None = None
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        break
    assert module is not None, f"{dotted}: no importable module prefix"
    obj: Any = module
    for attr in parts[cut:]:
        obj = getattr(obj, attr)
    return obj


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


def test_the_guide_cites_enough_to_be_checked() -> None:
    # A parsing mistake here would make the other tests pass on nothing.
    assert len(dotted_names()) >= 60
    assert len([p for p in path_refs() if p[1]]) >= 70


@pytest.mark.parametrize("dotted", dotted_names())
def test_dotted_name_exists(dotted: str) -> None:
    resolve(dotted)


@pytest.mark.parametrize(("path", "name"), path_refs())
def test_path_exists(path: str, name: str) -> None:
    target = ROOT / path
    assert target.exists(), f"{path} does not exist"
    if name:
        assert name in defined_names(target), f"{path} defines no {name}"


def test_code_block_imports_resolve() -> None:
    lines = [
        line for block in _FENCE.findall(guide()) for line in block.splitlines()
        if _FROM_IMPORT.match(line)
    ]
    assert lines
    for line in lines:
        match = _FROM_IMPORT.match(line)
        assert match is not None
        module = importlib.import_module(match.group(1))
        for name in match.group(2).split(","):
            name = name.split(" as ")[0].strip()
            assert hasattr(module, name) or importlib.util.find_spec(
                f"{match.group(1)}.{name}"
            ), f"{line.strip()}: no {name}"


@pytest.mark.parametrize("name", MONOLITH_SYMBOLS + MONOLITH_TESTS)
def test_every_seed_symbol_and_test_is_mapped(name: str) -> None:
    assert re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", guide()), (
        f"the guide does not mention {name}"
    )


def test_resolve_rejects_a_missing_name() -> None:
    with pytest.raises(AttributeError):
        resolve("ps_client.PsClient.no_such_method")
    with pytest.raises(AssertionError):
        resolve("ps_clientx.nothing")


# ---------------------------------------------------------------- self-contained docs

# Built from pieces so this file does not match itself.
_OUTSIDE = ("../" + "shared", "monolith-" + "semantics.md")
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def text_files() -> list[Path]:
    """Every text file of the repository (git's list when there is one), ``.venv`` aside."""
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.split("\n")
        paths = [ROOT / p for p in listed if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if p.is_file()]
    out = []
    for path in paths:
        rel = path.relative_to(ROOT).parts
        if rel[0] in (".venv", ".git") or not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        out.append(path)
    return out


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_nothing_points_outside_the_repository() -> None:
    files = text_files()
    assert len(files) > 50
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(word in line for word in _OUTSIDE)
    ]
    assert not offenders, "points outside the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    links = _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_pages_exist_and_the_readme_links_them() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("api.md", "semantics.md", "architecture.md", "operations.md"):
        assert (ROOT / "docs" / name).is_file(), name
        assert f"](docs/{name})" in readme, f"README.md does not link docs/{name}"


def test_slug_follows_github() -> None:
    assert slug("14. Monolith's compiled C++ as ground truth") == (
        "14-monoliths-compiled-c-as-ground-truth"
    )
    assert slug("4.2 Operations") == "42-operations"
    assert slug("`ps-admin`") == "ps-admin"
