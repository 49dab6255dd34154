"""ServerConfig is the one declaration of the shard's options; the flags come from it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from absl import flags

from ps_server import gflags_utils
from ps_server.config import ServerConfig
from ps_server.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FIELDS = [f.name for f in dataclasses.fields(ServerConfig)]


def _fold(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def helpfull() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ps_server", "--helpfull"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert "--shard_index" in result.stdout, result.stderr[-2000:]
    return result.stdout


def _flag_block(helpfull: str, name: str) -> str:
    """The help text absl printed for ``--name`` (wrapped lines folded)."""
    lines = helpfull.splitlines()
    start = [i for i, line in enumerate(lines)
             if re.match(rf"^\s+--(\[no\])?{re.escape(name)}:", line)]
    assert len(start) == 1, f"--{name} is listed {len(start)} times in --helpfull"
    block = [lines[start[0]]]
    for line in lines[start[0] + 1:]:
        if re.match(r"^\s+--", line) or not line.startswith("    "):
            break
        block.append(line)
    return _fold(" ".join(block))


def test_every_field_is_documented_once() -> None:
    helps = gflags_utils.extract_help_info(ServerConfig)
    assert sorted(helps) == sorted(FIELDS)
    assert all(helps[name] for name in FIELDS)


@pytest.mark.parametrize("name", FIELDS)
def test_helpfull_lists_the_field_with_its_help_and_default(helpfull: str, name: str) -> None:
    block = _flag_block(helpfull, name)
    help_text = _fold(gflags_utils.extract_help_info(ServerConfig)[name])
    # absl wraps at 80 columns and may break a long word with a hyphen; compare words.
    assert help_text.replace("-", "") in block.replace("- ", "").replace("-", ""), block
    default = getattr(ServerConfig, name)
    assert f"default={default}," in block.replace("- ", "")


def test_helpshort_lists_them_too() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ps_server", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", result.stdout, re.MULTILINE))
    assert set(FIELDS) <= listed


def _fresh_flags() -> flags.FlagValues:
    """The flags ``ps_server.__main__`` defines, in a FlagValues of their own."""
    fv = flags.FlagValues()
    module = SimpleNamespace(
        FLAGS=fv, Error=flags.Error, DEFINE_integer=flags.DEFINE_integer,
        DEFINE_bool=flags.DEFINE_bool, DEFINE_string=flags.DEFINE_string,
        DEFINE_float=flags.DEFINE_float, DEFINE_enum=flags.DEFINE_enum,
    )
    gflags_utils.extract_flags(module, ServerConfig)
    return fv


def test_flags_parse_into_the_config() -> None:
    from ps_server.__main__ import config_from_flags

    fv = _fresh_flags()
    assert sorted(fv) == sorted(FIELDS)
    fv(["ps-server"])
    assert config_from_flags(fv) == ServerConfig()

    fv = _fresh_flags()
    fv([
        "ps-server", "--host=0.0.0.0", "--port=7000", "--shard_index=2", "--num_shards=3",
        "--data_root=/data", "--max_message_bytes=1024", "--grace_seconds=2.5",
        "--metrics_port=9100", "--eviction_check_seconds=0", "--default_filter_capacity=1000",
        "--default_filter_split_num=5", "--tls_cert_file=c.pem", "--tls_key_file=k.pem",
        "--tls_client_ca_file=ca.pem", "--data_token=d", "--admin_token_file=a.txt",
        "--max_entries_per_shard=100", "--max_bytes_per_shard=2000", "--max_ids_per_request=10",
    ])
    config = config_from_flags(fv)
    assert config == ServerConfig(
        host="0.0.0.0", port=7000, shard_index=2, num_shards=3, data_root="/data",
        max_message_bytes=1024, grace_seconds=2.5, metrics_port=9100,
        eviction_check_seconds=0.0, default_filter_capacity=1000, default_filter_split_num=5,
        tls_cert_file="c.pem", tls_key_file="k.pem", tls_client_ca_file="ca.pem",
        data_token="d", admin_token_file="a.txt", max_entries_per_shard=100,
        max_bytes_per_shard=2000, max_ids_per_request=10,
    )
    assert "'d'" not in repr(config)  # tokens stay out of logs


def test_main_defines_a_flag_for_every_field() -> None:
    import ps_server.__main__  # noqa: F401 - defines the flags in absl's FLAGS

    assert set(FIELDS) <= set(flags.FLAGS)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"metrics_port": 70000}, "metrics_port must be in [0, 65535]"),
        ({"port": 9100, "metrics_port": 9100}, "metrics_port and port must differ"),
        ({"eviction_check_seconds": -1.0}, "eviction_check_seconds must be >= 0"),
        ({"default_filter_capacity": 0}, "default_filter_capacity"),
        ({"tls_cert_file": "c.pem"}, "tls_cert_file and tls_key_file go together"),
        ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file (mutual TLS) needs"),
        ({"data_token": "d", "data_token_file": "d.txt"}, "data_token or data_token_file"),
        ({"admin_token": "a", "admin_token_file": "a.txt"}, "admin_token or admin_token_file"),
        ({"max_entries_per_shard": -1}, "max_entries_per_shard must be >= 0"),
        ({"max_bytes_per_shard": -1}, "max_bytes_per_shard must be >= 0"),
        ({"max_ids_per_request": -1}, "max_ids_per_request must be >= 0"),
    ],
)
def test_invalid_new_options_are_refused(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(**kwargs)  # type: ignore[arg-type]
    assert words in str(info.value)


def test_an_invalid_flag_value_is_a_usage_error_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ps_server", "--metrics_port=70000"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "metrics_port must be in [0, 65535], got 70000" in result.stderr
