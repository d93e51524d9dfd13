"""The policy (roles to commands) and the message validators."""

from __future__ import annotations

from pathlib import Path

import pytest
from korinet_admin import protocol as p
from korinet_admin.policy import DEFAULT_POLICY, Policy, argv_matches

POLICY = """
[roles.admin]
commands = ["uptime", "df **", "systemctl status *", "echo 'two words'"]

[roles.root]
commands = ["**"]
shell = true
files = true
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return Policy.load(path)


@pytest.mark.parametrize(
    ("pattern", "argv", "expected"),
    [
        (["uptime"], ["uptime"], True),
        (["uptime"], ["uptime", "-p"], False),
        (["df", "**"], ["df"], True),
        (["df", "**"], ["df", "-h", "/"], True),
        (["systemctl", "status", "*"], ["systemctl", "status", "nginx"], True),
        (["systemctl", "status", "*"], ["systemctl", "status", "a", "b"], False),
        (["systemctl", "status", "*"], ["systemctl", "restart", "nginx"], False),
        (["*"], ["rm -rf /"], True),  # one argument: * matches one element only
        (["*"], ["rm", "-rf"], False),
        (["**"], ["anything", "at", "all"], True),
    ],
)
def test_argv_patterns_match_one_argument_per_element(pattern: list, argv: list, expected: bool) -> None:
    assert argv_matches(pattern, argv) is expected


def test_roles_allow_what_they_list(policy: Policy) -> None:
    assert policy.check_command({"admin"}, ["df", "-h"], shell=False).allowed
    assert policy.check_command({"admin"}, ["echo", "two words"], shell=False).allowed
    denied = policy.check_command({"admin"}, ["rm", "-rf", "/tmp/x"], shell=False)
    assert not denied.allowed and "rm -rf /tmp/x" in denied.reason
    assert policy.check_command({"admin", "root"}, ["rm", "-rf", "/tmp/x"], shell=False).allowed
    assert not policy.check_command({"admin"}, ["df"], shell=True).allowed
    assert policy.check_command({"root"}, ["echo hi | wc"], shell=True).allowed
    assert not policy.check_command(set(), ["uptime"], shell=False).allowed


def test_files_need_a_role_that_allows_them(policy: Policy) -> None:
    assert not policy.check_files({"admin"}).allowed
    assert policy.check_files({"admin", "root"}).allowed


def test_the_default_lets_admin_do_everything() -> None:
    assert DEFAULT_POLICY.check_command({"admin"}, ["any", "thing"], shell=False).allowed
    assert DEFAULT_POLICY.check_command({"admin"}, ["x"], shell=True).allowed
    assert DEFAULT_POLICY.check_files({"admin"}).allowed
    assert not DEFAULT_POLICY.check_command({"users"}, ["uptime"], shell=False).allowed


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[roles.a]\ncommands = 'uptime'", "list of strings"),
        ("[roles.a]\nshell = 'yes'", "true or false"),
        ("[roles.a]\nsudo = true", "unknown key"),
        ("[other]\nx = 1", "unknown section"),
        ("[roles.a]\ncommands = ['echo \"unterminated']", "bad pattern"),
        ("[roles.a\n", "policy.toml"),
    ],
)
def test_a_bad_policy_file_is_refused_with_a_reason(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        Policy.load(path)


JOB = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("validate", "payload"),
    [
        (p.validate_exec, {"job": "short", "argv": ["true"]}),
        (p.validate_exec, {"job": JOB, "argv": []}),
        (p.validate_exec, {"job": JOB, "argv": ["a\0b"]}),
        (p.validate_exec, {"job": JOB, "argv": [1]}),
        (p.validate_exec, {"job": JOB, "argv": ["x"], "timeout": -1}),
        (p.validate_exec, {"job": JOB, "argv": ["x"], "shell": "yes"}),
        (p.validate_exec, {"job": JOB, "argv": ["x"], "offsets": [0]}),
        (p.validate_exec, ["not", "a", "map"]),
        (p.validate_stdin, {"job": JOB, "offset": -1, "data": b""}),
        (p.validate_stdin, {"job": JOB, "offset": 0, "data": "text"}),
        (p.validate_stdin, {"job": JOB, "offset": 0, "data": b"x" * (p.MAX_CHUNK + 1)}),
        (p.validate_signal, {"job": JOB, "signal": 0}),
        (p.validate_signal, {"job": JOB, "signal": True}),
        (p.validate_get_chunk, {"path": "/x", "offset": 0, "length": p.MAX_CHUNK + 1}),
        (p.validate_put_open, {"path": "", "size": 1, "sha256": "0" * 64}),
        (p.validate_put_open, {"path": "/x", "size": 1, "sha256": "XYZ"}),
    ],
)
def test_validators_reject_malformed_requests(validate: object, payload: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        validate(payload)  # type: ignore[operator]


def test_validators_accept_well_formed_requests() -> None:
    p.validate_exec({"job": JOB, "argv": ["ls", "-l"], "timeout": 2.5, "offsets": [0, 10]})
    p.validate_attach({"job": JOB, "offsets": None})
    p.validate_stdin({"job": JOB, "offset": 3, "data": b"abc", "eof": True})
    p.validate_signal({"job": JOB, "signal": 9})


@pytest.mark.parametrize(
    ("notice", "code"),
    [
        ({"code": 0, "signal": None, "timed_out": False}, 0),
        ({"code": 42, "signal": None, "timed_out": False}, 42),
        ({"code": None, "signal": 9, "timed_out": False}, 137),
        ({"code": None, "signal": 15, "timed_out": True}, 124),
        ({"code": None, "signal": None, "timed_out": False}, 255),
    ],
)
def test_exit_status_follows_ssh(notice: dict, code: int) -> None:
    assert p.exit_status(notice) == code
