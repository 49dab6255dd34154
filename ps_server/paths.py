"""Where a save or restore may touch the disk: confinement to the shard's data root."""

from __future__ import annotations

import os
from typing import Final

from ps_server.errors import InvalidArgumentError, PathOutsideRootError

__all__ = ["MAX_PATH_CHARS", "MAX_PATH_DEPTH", "resolve_path"]

#: Save/restore paths must be shorter than this many characters (Linux's PATH_MAX)...
MAX_PATH_CHARS: Final = 4096
#: ... and have fewer levels (directories are created one level at a time).
MAX_PATH_DEPTH: Final = 128


def resolve_path(path: str, data_root: str, what: str = "path", *, prefix: bool = True) -> str:
    """Where a save/restore ``path`` points, checked against ``data_root``.

    Without a data root the path is used as given. With one, a relative path is
    taken under the root, symlinks are resolved (``realpath``), and the result must
    lie inside the root; for a file-name ``prefix`` (files are ``<path>_...``) it must
    lie strictly inside, for a directory it may be the root itself.

    :raises InvalidArgumentError: empty path, a NUL character in it, or a path of
        :data:`MAX_PATH_CHARS` characters or :data:`MAX_PATH_DEPTH` levels or more.
    :raises PathOutsideRootError: the resolved path escapes the root.
    """
    if not path:
        raise InvalidArgumentError(f"{what} must not be empty")
    if "\0" in path:
        raise InvalidArgumentError(f"{what} {path!r} contains a NUL character")
    if len(path) >= MAX_PATH_CHARS or path.count("/") >= MAX_PATH_DEPTH:
        raise InvalidArgumentError(
            f"{what} is {len(path)} characters and {path.count('/') + 1} levels deep; it "
            f"must be shorter than {MAX_PATH_CHARS} characters and {MAX_PATH_DEPTH} levels"
        )
    if not data_root:
        return path
    root = os.path.realpath(data_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise PathOutsideRootError(
            f"{what} {path!r} resolves to {full!r}, which is outside the data root {root!r}; "
            "use a path under the data root"
        )
    if prefix and full == root:
        raise PathOutsideRootError(
            f"{what} {path!r} is the data root {root!r} itself: its files would land outside "
            "the data root; name a file prefix under it (e.g. 'dir/name')"
        )
    return full
