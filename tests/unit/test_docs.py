"""docs/monolith-migration.md names only things that exist, and names all it promises.

Every ``ps_client.…`` / ``ps_server.…`` / ``protos.…`` dotted name in a code span must
import (module prefix) and resolve (attributes); every repository path in a code span
must exist, and ``path::name`` must name a function or class defined in that file;
every ``from … import …`` line of a code block must import. The guide must also cite
each Monolith symbol and test of the seed documents it maps.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
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
