"""known_hosts (what a client pinned) and authorized_keys (whom a server admits)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from korinet.exceptions import AuthenticationError, HostKeyChanged
from korinet.security import AuthorizedKeys, Identity, KnownHosts, PeerIdentity, host_address

FP1 = Identity.generate().fingerprint
FP2 = Identity.generate().fingerprint


# ---------------------------------------------------------------------- known_hosts


def test_first_use_pins_then_the_same_key_passes(home: Path) -> None:
    hosts = KnownHosts()
    assert hosts.path == home / "known_hosts"
    assert hosts.check("example:1235", FP1) is True  # new: pinned
    assert hosts.check("example:1235", FP1) is False  # known, same key
    assert hosts.check("other:1235", FP2) is True  # pins are per address
    assert hosts.lookup("example:1235") == (FP1, 3)  # after the two header lines
    assert stat.S_IMODE(hosts.path.stat().st_mode) == 0o600


def test_a_changed_key_is_a_clear_hard_error(home: Path) -> None:
    hosts = KnownHosts()
    hosts.check("a:1", FP2)
    hosts.check("example:1235", FP1)
    with pytest.raises(HostKeyChanged) as info:
        hosts.check("example:1235", FP2)
    error = info.value
    assert isinstance(error, AuthenticationError)
    assert (error.address, error.pinned, error.offered) == ("example:1235", FP1, FP2)
    assert error.path == str(hosts.path) and error.line == 4
    message = str(error)
    for part in (FP1, FP2, "CHANGED", f"delete line 4 of {hosts.path}"):
        assert part in message
    # Deleting the line, as the message says, lets the new key be pinned.
    lines = hosts.path.read_text().splitlines()
    del lines[error.line - 1]
    hosts.path.write_text("\n".join(lines) + "\n")
    assert hosts.check("example:1235", FP2) is True


def test_host_address_brackets_ipv6() -> None:
    assert host_address("::1", 80) == "[::1]:80"
    assert host_address("10.0.0.1", 80) == "10.0.0.1:80"


def test_malformed_known_hosts_lines_are_skipped(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    hosts = KnownHosts()
    hosts.path.parent.mkdir(parents=True, exist_ok=True)
    hosts.path.write_text(f"garbage\nexample:1 {FP1}  # comment\n")
    with caplog.at_level(logging.WARNING):
        assert hosts.lookup("example:1") == (FP1, 2)
    assert "malformed" in caplog.text


# ---------------------------------------------------------------------- authorized_keys


def test_authorize_adds_updates_and_revokes(home: Path) -> None:
    keys = AuthorizedKeys()
    assert keys.path == home / "authorized_keys"
    assert keys.lookup(FP1) is None  # no file: nobody
    assert keys.authorize(FP1, "alice", ["admin", "chat"]) is True
    assert keys.authorize(FP2, "bob") is True
    entry = keys.lookup(FP1)
    assert entry is not None and entry.identity() == PeerIdentity("alice", FP1, frozenset({"admin", "chat"}))
    assert keys.authorize(FP1, "alice", ["chat"]) is False  # replaced in place
    assert keys.lookup(FP1).roles == {"chat"}  # type: ignore[union-attr]
    assert [e.name for e in keys.entries()] == ["alice", "bob"]
    assert keys.revoke(FP1) is True
    assert keys.lookup(FP1) is None and keys.lookup(FP2) is not None
    assert keys.revoke(FP1) is False
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600


def test_edits_by_hand_take_effect_on_the_next_lookup(home: Path) -> None:
    keys = AuthorizedKeys()
    keys.authorize(FP1, "alice")
    assert keys.lookup(FP1) is not None
    keys.path.write_text(f"# revoked alice, added bob by hand\n{FP2}   bob   ops,chat  # comment\n")
    assert keys.lookup(FP1) is None
    assert keys.lookup(FP2).roles == {"ops", "chat"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("SHA256:nope alice", "not a KoriNet fingerprint"),
        (f"{FP1}", "expected FINGERPRINT NAME"),
        (f"{FP1} alice admin extra", "expected FINGERPRINT NAME"),
        (f"{FP1} al!ce", "bad name"),
        (f"{FP1} alice ad min,", "expected FINGERPRINT NAME"),
        (f"{FP1} alice admin,", "bad role"),
        (f"{FP1} alice\n{FP1} again", "already authorized on line 3"),
    ],
)
def test_a_malformed_file_names_the_line_and_fails_closed(
    home: Path, line: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = AuthorizedKeys()
    keys.path.parent.mkdir(parents=True, exist_ok=True)
    keys.path.write_text(f"# header\n{FP2} bob\n{line}\n")
    with pytest.raises(ValueError, match=error) as info:
        keys.entries()
    assert f"{keys.path}:" in str(info.value)
    with caplog.at_level(logging.ERROR):
        assert keys.lookup(FP2) is None  # even bob, listed correctly: fail closed
    assert "refusing every client" in caplog.text
    with pytest.raises(ValueError):
        keys.authorize(FP1, "carol")  # never rewrite a file we cannot read


def test_authorize_checks_its_arguments(home: Path) -> None:
    keys = AuthorizedKeys()
    with pytest.raises(ValueError, match="not a KoriNet fingerprint"):
        keys.authorize("SHA256:abc", "alice")
    with pytest.raises(ValueError, match="bad name"):
        keys.authorize(FP1, "two words")
    with pytest.raises(ValueError, match="bad role"):
        keys.authorize(FP1, "alice", ["a,b"])
    assert not keys.path.exists()


def test_check_server_pins_by_host_and_port_and_fails_closed(home: Path) -> None:
    # The one check both clients (asyncio and blocking) make on the certificate bytes.
    from cryptography.hazmat.primitives.serialization import Encoding

    from korinet.security import ClientTLS

    server = Identity.generate()
    der = server.certificate.public_bytes(Encoding.DER)
    tls = ClientTLS(known_hosts=KnownHosts(home / "known_hosts"))
    assert tls.check_server("::1", 1235, der).fingerprint == server.fingerprint
    assert KnownHosts(home / "known_hosts").lookup("[::1]:1235") is not None
    with pytest.raises(AuthenticationError, match="presented no certificate"):
        tls.check_server("::1", 1235, None)
    broken = ClientTLS(known_hosts=KnownHosts(home / "a-directory"))
    (home / "a-directory").mkdir()
    with pytest.raises(AuthenticationError, match=r"cannot check the key of example:1"):
        broken.check_server("example", 1, der)
