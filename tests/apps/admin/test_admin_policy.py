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
files = ["/srv"]
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
        (["*"], ["rm -rf x"], True),  # one argument: * matches one element only
        (["*"], ["rm", "-rf"], False),
        (["**"], ["anything", "at", "all"], True),
    ],
)
def test_argv_patterns_match_one_argument_per_element(pattern: list, argv: list, expected: bool) -> None:
    assert argv_matches(pattern, argv) is expected


@pytest.mark.parametrize(
    ("pattern", "argv", "expected"),
    [
        # globs stay within one path component
        ("cat /var/log/*", ["cat", "/var/log/syslog"], True),
        ("cat /var/log/*", ["cat", "/var/log/nginx/access.log"], False),
        ("cat /var/log/*", ["cat", "/var/log//etc/shadow"], False),
        ("cat /var/log/*/*.log", ["cat", "/var/log/nginx/access.log"], True),
        ("cat /var/log/?", ["cat", "/var/log/a"], True),
        ("cat /var/log/[a/]b", ["cat", "/var/log/a"], False),
        ("cat *", ["cat", "/etc/shadow"], False),
        ("systemctl status *", ["systemctl", "status", "../../x"], False),
        # .. is matched only literally, never by a glob
        ("cat /var/log/*", ["cat", "/var/log/.."], False),
        ("cat /var/log/*/*", ["cat", "/var/log/../shadow"], False),
        ("cat /var/log/*/../x", ["cat", "/var/log/a/../x"], True),
        ("cat /var/log/*", ["cat", "/var/log/..."], True),  # a name, not the parent
        # options: only a pattern element starting with - matches one
        ("ls -l *", ["ls", "-l", "--help"], False),
        ("ls -l *", ["ls", "-l", "-a"], False),
        ("ls -l *", ["ls", "-l", "docs"], True),
        ("ls -l *", ["ls", "--l", "docs"], False),
        ("ls -* *", ["ls", "-la", "docs"], True),
        ("journalctl --unit=*", ["journalctl", "--unit=nginx"], True),
        ("journalctl --unit=*", ["journalctl", "--unit=../../x"], False),
        ("cat *", ["cat", "-"], False),
        ("* status", ["--help", "status"], False),
        # a last ** means any further arguments, options included: said in docs/ADMIN.md
        ("find **", ["find", "/", "-exec", "sh", ";"], True),
    ],
)
def test_a_pattern_means_what_it_says(pattern: str, argv: list, expected: bool) -> None:
    policy = Policy.from_mapping({"roles": {"admin": {"commands": [pattern]}}})
    assert argv_matches(policy.roles["admin"].commands[0], argv) is expected
    assert policy.check_command({"admin"}, argv, shell=False).allowed is expected


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
    assert "no role" in policy.check_path({"admin"}, "/srv/x").reason


def test_files_are_limited_to_the_listed_directories(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(allowed)  # a listed directory may itself be a link
    policy = Policy.from_mapping(
        {"roles": {"ops": {"files": [str(tmp_path / "link"), "/srv/app/"]}, "other": {"files": False}}}
    )
    assert policy.roles["ops"].files == (str(tmp_path / "link"), "/srv/app")
    assert policy.check_path({"ops"}, str(allowed / "f")).allowed
    assert policy.check_path({"ops"}, str(allowed / "sub" / "f")).allowed
    assert policy.check_path({"ops"}, "/srv/app/x").allowed
    assert not policy.check_path({"ops"}, "/srv/app").allowed  # the directory itself is not a file in it
    assert not policy.check_path({"ops"}, "/srv/application").allowed
    denied = policy.check_path({"ops"}, str(tmp_path / "elsewhere" / "f"))
    assert not denied.allowed and "outside the directories" in denied.reason and "/srv/app" in denied.reason
    assert not policy.check_path({"other"}, str(allowed / "f")).allowed
    assert not policy.check_files({"other"}).allowed


def test_the_default_lets_admin_do_everything() -> None:
    assert DEFAULT_POLICY.check_command({"admin"}, ["any", "thing"], shell=False).allowed
    assert DEFAULT_POLICY.check_command({"admin"}, ["x"], shell=True).allowed
    assert DEFAULT_POLICY.check_files({"admin"}).allowed
    assert DEFAULT_POLICY.check_path({"admin"}, "/etc/shadow").allowed
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
        ("[roles.a]\nfiles = true", r'files = true is no longer accepted: .*files = \["/srv/app"\]'),
        ("[roles.a]\nfiles = '/srv'", "list of directories"),
        ("[roles.a]\nfiles = ['srv/app']", "absolute path"),
        ("[roles.a]\nfiles = ['/srv/../etc']", "without \\.\\."),
        ("[roles.a]\ncommands = ['cat /var/**']", r"\*\* is only allowed on its own"),
        ("[roles.a]\ncommands = ['ls ** -l']", r"\*\* is only allowed on its own"),
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
