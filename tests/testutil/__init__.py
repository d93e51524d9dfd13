"""Shared test settings. Every timing in the runtime tests scales by one factor."""

from __future__ import annotations

import os

#: Raise on a slow machine (e.g. KORINET_TEST_TIMEOUT_FACTOR=3) instead of editing tests.
TIMEOUT_FACTOR = float(os.environ.get("KORINET_TEST_TIMEOUT_FACTOR", "1"))
