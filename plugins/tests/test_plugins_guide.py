"""docs/PLUGINS.md stays true: its example runs as printed, and it documents every
hook of korinet/hookspecs.py with the spec's own parameters."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import hookspecs

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "PLUGINS.md"


def example(name: str) -> str:
    text = GUIDE.read_text()
    found = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)\n```", text, re.S)
    assert found, f"no example {name} in {GUIDE}"
    return found.group(1) + "\n"


def test_the_example_runs_and_prints_what_the_guide_says(tmp_path: Path) -> None:
    script = tmp_path / "shout.py"
    script.write_text(example("shout.py"))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30 * TIMEOUT_FACTOR,
        env={**os.environ, "KORINET_DISABLE_PLUGINS": ""},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    printed = re.search(r"Its output:\n\n```\n(.*?)```", GUIDE.read_text(), re.S)
    assert printed
    assert result.stdout == printed.group(1)
    assert "opened: ServerPeer" in result.stderr and "opened: Client" in result.stderr


HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("korinet_"))


def test_there_are_hooks_to_document() -> None:
    assert len(HOOKS) >= 9


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook: str) -> None:
    params = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    heading = re.search(rf"^### `{hook}\((.*?)\)( -> .*)?`$", GUIDE.read_text(), re.M)
    assert heading, f"docs/PLUGINS.md has no section for {hook}"
    documented = [p.split(":")[0].strip() for p in heading.group(1).split(",") if p.strip()]
    assert documented == params
