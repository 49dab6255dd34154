"""Where a save or restore may touch the disk: confinement to the shard's data root."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ps_server.errors import InvalidArgumentError, PathOutsideRootError

__all__ = ["MAX_PATH_CHARS", "MAX_PATH_DEPTH", "UNCONFINED", "DataRoot", "resolve_path"]

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
    full = _confinable(os.path.join(root, path), what, path)
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


def _confinable(path: str, what: str, named: str) -> str:
    """``realpath(path)``, refused when symbolic links along it form a loop: the real
    path is then unknown (``realpath`` leaves the loop unresolved), so it cannot be
    shown to lie inside the root, and any use of it fails with ELOOP.

    :raises PathOutsideRootError: naming ``named``.
    """
    try:
        return os.path.realpath(path, strict=True)
    except OSError as e:
        if e.errno != errno.ELOOP:
            return os.path.realpath(path)  # a missing tail is taken as named
    raise PathOutsideRootError(
        f"{what} {named!r} leads into a loop of symbolic links, so where it resolves "
        "cannot be confined to the data root; nothing was read or written there: replace "
        "the links with directories or files inside the root"
    )


@dataclass(frozen=True)
class DataRoot:
    """The confinement of the files a save or restore touches below its request path.

    :func:`resolve_path` checks the path a request names; the checkpoint code derives
    more paths below it (assets directories, part files, part lists, the manifest, the
    ``checkpoint`` index) and checks each with :meth:`check` right before it opens,
    creates, lists or deletes it, so a symbolic link planted at any level inside the
    root cannot lead outside it. ``root`` is the real path of the data root; ``""``
    confines nothing (a server without ``--data_root``).
    """

    root: str = ""

    @classmethod
    def of(cls, data_root: str) -> DataRoot:
        """The confinement to ``data_root`` (``""``: none)."""
        return cls(os.path.realpath(data_root) if data_root else "")

    def check(self, path: str, what: str = "file") -> str:
        """``path`` itself, once its real path (every symbolic link resolved, at every
        level; a missing tail taken as named) is found inside the root.

        :raises PathOutsideRootError: it resolves outside the root.
        """
        if not self.root:
            return path
        full = _confinable(path, what, path)
        if os.path.commonpath([self.root, full]) != self.root:
            raise PathOutsideRootError(
                f"{what} {path} resolves to {full}, which is outside the data root "
                f"{self.root} (a symbolic link leads out of it); nothing was read or "
                "written there: replace the link with a directory or file inside the root"
            )
        return path

    def check_all(self, paths: Iterable[str], what: str = "file") -> None:
        """:meth:`check` each of ``paths``."""
        if self.root:
            for path in paths:
                self.check(path, what)


#: No confinement (the default of the checkpoint functions).
UNCONFINED: Final = DataRoot()
