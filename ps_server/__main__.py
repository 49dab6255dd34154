"""``python -m ps_server`` / ``ps-server``: run one shard until SIGTERM or SIGINT.

Every flag is a field of :class:`ps_server.config.ServerConfig` with the same name,
default and help (taken from the dataclass docstring), e.g.::

    python -m ps_server --port=0 --shard_index=1 --num_shards=4 --port_file=/tmp/p1
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence

from absl import app, flags

from ps_server.config import ServerConfig
from ps_server.errors import ConfigError
from ps_server.server import run

_PARAM = re.compile(r"^:param\s+([a-zA-Z0-9._-]+)\s*:\s*(.*)")


def _field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``:param name: help`` lines of ``cls``'s docstring
    (continuation lines append to the current entry)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in (cls.__doc__ or "").splitlines():
        line = " ".join(raw.split())
        if not line:
            continue
        m = _PARAM.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            current.append(m.group(2))
        elif current is not None:
            current.append(line)
    return {name: " ".join(parts) for name, parts in out.items()}


def _define_flags(flag_values: flags.FlagValues) -> None:
    helps = _field_help(ServerConfig)
    for field in dataclasses.fields(ServerConfig):
        name, default, text = field.name, field.default, helps[field.name]
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, text, flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, str(default), text, flag_values=flag_values)


_define_flags(flags.FLAGS)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ServerConfig:
    """The :class:`ServerConfig` the parsed flags describe.

    :raises ConfigError: invalid values (names the flag).
    """
    return ServerConfig(**{
        f.name: getattr(flag_values, f.name) for f in dataclasses.fields(ServerConfig)
    })


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags()
    except ConfigError as e:
        raise app.UsageError(str(e)) from e
    try:
        run(config)
    except ConfigError as e:  # e.g. the port is taken
        sys.exit(f"ps_server: {e}")


def main() -> None:
    """Entry point of ``ps-server`` and ``python -m ps_server``."""
    app.run(_main)


if __name__ == "__main__":
    main()
