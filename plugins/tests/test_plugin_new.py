"""`korinet plugin new`: the package it writes passes its own tests as generated,
with its entry point installed; bad names and existing folders are refused.

The package is "installed" as pip would leave it, without pip (tests stay offline and
leave the shared environment alone): a dist-info folder made from the generated
pyproject.toml (name, version, dependencies, entry points) on PYTHONPATH, next to
its src/. CI also installs one with pip and runs its tests (.ci/run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from testutil import TIMEOUT_FACTOR

import korinet
from korinet.scaffold import PluginSpec, ScaffoldError, compatible_range, write_plugin

T = 120 * TIMEOUT_FACTOR


def korinet_cmd(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "korinet.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=T,
        env=env,
    )


def install_like_pip(root: Path, site: Path) -> None:
    """What `pip install root` leaves for importlib.metadata, from root's pyproject."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    metadata = [f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}"]
    metadata += [f"Requires-Dist: {req}" for req in project["dependencies"]]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    entry_points = project["entry-points"]["korinet"]
    (info / "entry_points.txt").write_text(
        "[korinet]\n" + "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    )


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("kori-echo", "--message-type", "echo.say", "--codec", "zlib+msgpack"), id="both"),
        pytest.param(("squash", "--codec", "squash+zlib"), id="codec-only"),
    ],
)
def test_a_generated_plugin_passes_its_own_tests_and_korinet_lists_it(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    empty = tmp_path / "work"
    empty.mkdir()
    made = korinet_cmd(empty, "plugin", "new", *args)
    assert made.returncode == 0, made.stderr
    spec = PluginSpec(args[0])
    root = empty / spec.distribution
    assert f"wrote {spec.distribution}/" in made.stdout
    assert (root / "src" / spec.package / "py.typed").exists()

    site = tmp_path / "site"
    install_like_pip(root, site)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(root / "src")]),
        "KORINET_HOME": str(tmp_path / "home"),
        "KORINET_METRICS_PORT": "",
    }
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", spec.distribution],
        cwd=empty,
        capture_output=True,
        text=True,
        timeout=T,
        env=env,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout and "failed" not in tests.stdout and "skipped" not in tests.stdout

    listed = korinet_cmd(empty, "plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    head = f"{args[0]} 0.1.0  loaded (supports korinet {compatible_range(korinet.__version__)})"
    assert head in listed.stdout.splitlines(), listed.stdout
    assert f"  codec         {args[-1]}" in listed.stdout
    help_ = korinet_cmd(empty, args[0], "--help", env=env)
    assert help_.returncode == 0 and "ADDRESS" in help_.stdout.upper(), help_.stdout + help_.stderr


def test_the_declared_range_admits_this_release_and_stops_before_the_next_breaking_one() -> None:
    assert compatible_range("0.1.0") == ">=0.1,<0.2"
    assert compatible_range("0.3.2rc1") == ">=0.3,<0.4"
    assert compatible_range("2.5.0") == ">=2.5,<3"


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (PluginSpec("Bad Name"), "lowercase letters"),
        (PluginSpec("serve"), "is a korinet command"),
        (PluginSpec("ok", message_type="has space"), "message type 'has space'"),
        (PluginSpec("ok", codec="msgpack"), "built into KoriNet"),
    ],
)
def test_names_the_template_cannot_use_are_refused(tmp_path: Path, spec: PluginSpec, error: str) -> None:
    with pytest.raises(ScaffoldError, match=error):
        write_plugin(spec, tmp_path, "0.1.0")
    assert not list(tmp_path.iterdir())


def test_an_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "korinet-mine").mkdir()
    (tmp_path / "korinet-mine" / "keep.txt").write_text("mine")
    result = korinet_cmd(tmp_path, "plugin", "new", "mine")
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert [p.name for p in (tmp_path / "korinet-mine").iterdir()] == ["keep.txt"]
