"""``python -m ps_server`` / ``ps-server``: run one shard until SIGTERM or SIGINT.

Every flag is a field of :class:`ps_server.config.ServerConfig` with the same name,
default and help, defined from the dataclass by
:func:`ps_server.gflags_utils.extract_flags` (``--help`` lists them), e.g.::

    python -m ps_server --port=0 --shard_index=1 --num_shards=4 --port_file=/tmp/p1 \\
        --metrics_port=9100
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from absl import app, flags

from ps_server import gflags_utils
from ps_server.config import ServerConfig
from ps_server.errors import ConfigError
from ps_server.server import run

__all__ = ["config_from_flags", "main"]


def _define_flags() -> None:
    gflags_utils.extract_flags(flags, ServerConfig)
    # extract_flags skips, silently, a field it cannot make a flag of; here that is a bug.
    missing = [f.name for f in dataclasses.fields(ServerConfig) if f.name not in flags.FLAGS]
    if missing:
        raise AssertionError(
            f"ServerConfig fields without a flag (no ':param' help line or an unsupported "
            f"type?): {', '.join(missing)}"
        )
    for field in dataclasses.fields(ServerConfig):
        # Listed by --helpshort / --help too, not only by --helpfull.
        flags.declare_key_flag(field.name)


_define_flags()


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ServerConfig:
    """The :class:`ServerConfig` the parsed flags describe (every field from its flag).

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


def _help_lists_flags(program: str) -> None:
    """Make ``--help`` list every flag when the program is ``program``.

    absl's ``--help`` lists the key flags of the module named by ``sys.argv[0]`` and
    prints that module's docstring. Run as ``python -m ps_server`` that is this module,
    whose flags are declared key above; run as the ``ps-server`` console script it is
    the script's wrapper, which declares none (``--help`` said only "Try --helpfull")
    and has no docstring.
    """
    for field in dataclasses.fields(ServerConfig):
        flags.FLAGS.register_key_flag_for_module(program, flags.FLAGS[field.name])
    main_module = sys.modules.get("__main__")
    if main_module is not None and not main_module.__doc__:
        main_module.__doc__ = __doc__


def main() -> None:
    """Entry point of ``ps-server`` and ``python -m ps_server``."""
    _help_lists_flags(sys.argv[0])
    app.run(_main)


if __name__ == "__main__":
    main()
