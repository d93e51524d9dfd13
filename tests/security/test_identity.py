"""Identities on disk: where, with which permissions, and their fingerprints."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from korinet.security import Identity, certificate_fingerprint, korinet_home, parse_fingerprint
from korinet.security.identity import CERT_FILE, KEY_FILE

FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_follows_the_environment(home: Path) -> None:
    assert korinet_home() == home


def test_load_or_create_makes_a_private_key_once(home: Path) -> None:
    assert not Identity.exists()
    first = Identity.load_or_create()
    assert Identity.exists()
    assert FINGERPRINT.fullmatch(first.fingerprint)
    assert mode(home / KEY_FILE) == 0o600
    assert mode(home / CERT_FILE) == 0o644
    assert mode(home) == 0o700
    again = Identity.load_or_create()
    assert again.fingerprint == first.fingerprint
    assert again.directory == home


def test_no_temporary_files_are_left_behind(home: Path) -> None:
    Identity.load_or_create()
    assert sorted(p.name for p in home.iterdir()) == [CERT_FILE, KEY_FILE]


def test_save_refuses_to_overwrite_without_being_told(home: Path) -> None:
    Identity.generate().save()
    with pytest.raises(FileExistsError):
        Identity.generate().save()
    replaced = Identity.generate().save(overwrite=True)
    assert Identity.load().fingerprint == replaced.fingerprint
    assert mode(home / KEY_FILE) == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_key_readable_by_others_is_refused(home: Path) -> None:
    Identity.load_or_create()
    os.chmod(home / KEY_FILE, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Identity.load()


def test_the_fingerprint_is_the_keys_not_the_certificates(home: Path) -> None:
    identity = Identity.load_or_create()
    (home / CERT_FILE).unlink()
    reissued = Identity.load()  # a lost certificate is issued again from the key
    assert reissued.fingerprint == identity.fingerprint
    assert reissued.certificate.serial_number != identity.certificate.serial_number
    assert (home / CERT_FILE).exists()


def test_certificate_fingerprint_matches_the_identity() -> None:
    identity = Identity.generate()
    der = identity.certificate.public_bytes(Encoding.DER)
    assert certificate_fingerprint(der) == identity.fingerprint


def test_a_certificate_for_another_key_is_refused() -> None:
    a, b = Identity.generate(), Identity.generate()
    with pytest.raises(ValueError, match="not for this private key"):
        Identity(a.key, b.certificate)


def test_parse_fingerprint() -> None:
    fp = Identity.generate().fingerprint
    assert parse_fingerprint(f"  {fp}\n") == fp
    for bad in ("", "SHA256:", fp[:-1], fp.replace("SHA256:", "MD5:"), fp + "A", "sha256:" + fp[7:]):
        with pytest.raises(ValueError, match="not a KoriNet fingerprint"):
            parse_fingerprint(bad)


def test_repr_shows_no_secret() -> None:
    identity = Identity.generate()
    assert "PRIVATE" not in repr(identity) and identity.fingerprint in repr(identity)
