"""How table and filter names become checkpoint file names (one rule, used by the
engine to refuse colliding names and by the checkpoint code to name files).

A name's *file stem* is the name with ``:`` and ``/`` replaced by ``-``
(docs/semantics.md §6.5). Table ``T`` of saving shard ``i`` is written as
``<stem(T)>_<i>-NNNNN-of-NNNNN``; filter files are ``hash_filter_<i>-…`` (a shard's
one file-saving filter) or ``hash_filter_<stem(F)>_<i>-…`` (several). So that every
file names exactly one table or filter:

* two tables (or two filters) whose stems are equal cannot coexist;
* a table's stem may not be ``hash_filter`` or begin with ``hash_filter_`` (the
  filters' files).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FILTER_FILE_STEM", "file_stem", "reserved_table_stem", "stem_collision"]

#: Stem of hash-filter files (Monolith's ``hash_filter_<i>-…``).
FILTER_FILE_STEM = "hash_filter"


def file_stem(name: str) -> str:
    """A table or filter name as used in file names: ``:`` and ``/`` become ``-``."""
    return name.replace(":", "-").replace("/", "-")


def reserved_table_stem(name: str) -> bool:
    """True if table ``name``'s files would look like hash-filter files."""
    stem = file_stem(name)
    return stem == FILTER_FILE_STEM or stem.startswith(FILTER_FILE_STEM + "_")


def stem_collision(name: str, existing: Iterable[str]) -> str | None:
    """The first of ``existing`` (other than ``name`` itself) with ``name``'s file stem."""
    stem = file_stem(name)
    for other in existing:
        if other != name and file_stem(other) == stem:
            return other
    return None
