"""The fleet inventory: the hosts file, groups, selections, last-seen states."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from korinet_admin.inventory import (
    InventoryError,
    load_inventory,
    load_seen,
    parse_inventory,
    record_seen,
)

HOSTS = """
[hosts.web1]
address = "192.0.2.11"
groups = ["web", "eu"]

[hosts.web2]
address = "192.0.2.12:1300"
key = "SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
groups = ["web"]

[hosts.db1]
address = "[2001:db8::5]:1237"

[hosts.db2]

[groups]
db = ["db1", "db2"]
eu = ["db1"]
"""


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.toml"
    path.write_text(HOSTS)
    return path


def names(hosts: list) -> list[str]:  # type: ignore[type-arg]
    return [h.name for h in hosts]


def test_groups_come_from_hosts_and_from_the_groups_table(inventory_file: Path) -> None:
    inv = load_inventory(inventory_file)
    assert inv.groups() == {
        "all": ["web1", "web2", "db1", "db2"],
        "web": ["web1", "web2"],
        "eu": ["web1", "db1"],
        "db": ["db1", "db2"],
    }
    assert inv.hosts["db2"].address == "db2"  # no address: the name is the address
    assert inv.hosts["web2"].key is not None and inv.hosts["web1"].key is None


def test_selections(inventory_file: Path) -> None:
    inv = load_inventory(inventory_file)
    assert names(inv.select("@web")) == ["web1", "web2"]
    assert names(inv.select("@all,!@web")) == ["db1", "db2"]
    assert names(inv.select("db*,web1")) == ["db1", "db2", "web1"]
    assert names(inv.select("@eu,@db")) == ["web1", "db1", "db2"]  # each host once, first order
    assert names(inv.select("web[2-9]")) == ["web2"]
    outside = inv.select("web1,10.0.0.7:1400")
    assert names(outside) == ["web1", "10.0.0.7:1400"]
    assert not outside[1].known and outside[1].address == "10.0.0.7:1400"


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ("@nope", "no group 'nope'.*groups: @all, @db, @eu, @web"),
        ("mail*", "'mail\\*' matches no host"),
        ("web1,,db1", "an empty item"),
        ("@web,!@web", "selects no host"),
    ],
)
def test_a_selection_that_names_nothing_says_so(inventory_file: Path, selection: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        load_inventory(inventory_file).select(selection)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hosts.web1]\nadress = 'x'\n", "unknown key\\(s\\) adress"),
        ("[hosts.web1]\nkey = 'md5:xx'\n", "must be a fingerprint"),
        ("[hosts.'a b']\n", "letters, digits"),
        ("[hosts.w]\n[groups]\nall = ['w']\n", "'all' is every host already"),
        ("[groups]\ndb = ['db9']\n", "lists 'db9', which has no \\[hosts.db9\\]"),
        ("[host.web1]\n", "unknown section"),
        ("[hosts.web1\n", "hosts.toml"),
    ],
)
def test_a_malformed_file_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    with pytest.raises(InventoryError, match=message) as info:
        load_inventory(path)
    assert "\n" not in str(info.value)


def test_no_file_is_an_empty_inventory_and_addresses_still_work(tmp_path: Path) -> None:
    inv = load_inventory(tmp_path / "absent.toml")
    assert inv.hosts == {}
    assert names(inv.select("a.example,b.example:1300")) == ["a.example", "b.example:1300"]
    with pytest.raises(InventoryError, match="no group 'web'"):
        inv.select("@web")


def test_last_seen_states_merge_and_are_private(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "hosts-seen.json"
    record_seen({"web1": ("done", "exit 0"), "web2": ("unreachable", "connection refused")}, path)
    record_seen({"web2": ("done", "exit 3")}, path)
    seen = load_seen(path)
    assert {h: s["state"] for h, s in seen.items()} == {"web1": "done", "web2": "done"}
    assert seen["web2"]["detail"] == "exit 3"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_seen(tmp_path / "none.json") == {}


def test_parse_inventory_accepts_the_minimal_forms() -> None:
    inv = parse_inventory({"hosts": {"a": {}, "b": {"groups": []}}})
    assert list(inv.hosts) == ["a", "b"] and inv.groups() == {"all": ["a", "b"]}
