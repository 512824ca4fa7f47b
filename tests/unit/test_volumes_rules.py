"""Pure rules about volumes: names, readability, shared storage, settings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from agents.errors import InvalidVolumeName, check_volume_name
from agents.settings import SettingsError, parse_listen, read_token_file
from agents.volumes import shared_storage_reason, unreadable_reason

PROJECT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["ab", "pgdata", "a.b-c_d", "0x", "Z9"])
def test_valid_volume_names(name: str) -> None:
    assert check_volume_name(name) == name


@pytest.mark.parametrize("name", ["", "a", "-x", ".x", "_x", "a b", "a/b", "é1", "a\n"])
def test_invalid_volume_names(name: str) -> None:
    with pytest.raises(InvalidVolumeName):
        check_volume_name(name)


@pytest.mark.parametrize(
    ("driver", "options", "readable"),
    [
        ("local", {}, True),
        ("local", {"type": "tmpfs", "device": "tmpfs", "o": "size=64m"}, False),
        ("local", {"type": "nfs", "o": "addr=10.0.0.1", "device": ":/export"}, False),
        ("local", {"type": "none", "o": "bind", "device": "/srv/data"}, False),
        ("local", {"device": "/srv/data"}, False),
        ("rexray/ebs", {}, False),
    ],
)
def test_unreadable_reason(driver: str, options: dict[str, str], readable: bool) -> None:
    assert (unreadable_reason(driver, options) is None) is readable


@pytest.mark.parametrize(
    ("driver", "options", "shared"),
    [
        ("local", {}, False),
        ("local", {"type": "tmpfs", "device": "tmpfs", "o": "size=64m"}, False),
        ("local", {"type": "nfs", "o": "addr=10.0.0.1,rw", "device": ":/export"}, True),
        ("local", {"type": "cifs", "device": "//srv/share"}, True),
        ("local", {"type": "none", "o": "bind", "device": "/srv/data"}, True),
        ("local", {"o": "rbind", "device": "/srv/data"}, True),
        ("local", {"type": "ext4", "device": "/dev/sdb1"}, False),
        ("other", {"type": "nfs"}, False),
    ],
)
def test_shared_storage_reason(driver: str, options: dict[str, str], shared: bool) -> None:
    assert (shared_storage_reason(driver, options) is not None) is shared


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8421", ("127.0.0.1", 8421)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8421", ":8421", "host:", "host:0", "host:70000", "host:x"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(SettingsError):
        parse_listen(listen)


def test_token_file(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# coordinator first\nfirst-token\n\n  second  \n")
    assert read_token_file(f) == ("first-token", "second")
    f.write_text("\n# nothing\n")
    with pytest.raises(SettingsError, match="no token"):
        read_token_file(f)
    with pytest.raises(SettingsError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_agents_never_import_the_coordinator() -> None:
    for path in (PROJECT / "agents").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "migrator" or n.startswith("migrator.") for n in names), path
