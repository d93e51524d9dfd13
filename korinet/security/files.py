"""Where KoriNet keeps its keys and lists, and how it writes them.

Everything lives in one directory: ``$KORINET_HOME`` when set (tests, several
identities on one machine), else the user's configuration directory as
platformdirs names it (``~/.config/korinet`` on Linux).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ENV_HOME", "ensure_home", "korinet_home", "write_atomically"]

#: The environment variable that overrides the configuration directory.
ENV_HOME = "KORINET_HOME"


def korinet_home() -> Path:
    """The directory holding key.pem, cert.pem, known_hosts and authorized_keys."""
    override = os.environ.get(ENV_HOME)
    if override:
        return Path(override)
    import platformdirs  # only when needed: the override is the common case in tests

    return Path(platformdirs.user_config_dir("korinet", appauthor=False))


def ensure_home(directory: Path) -> Path:
    """Create ``directory`` (mode 0700: only its owner may list the keys) if missing."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, created with ``mode`` from the start.

    The bytes go to a temporary file in the same directory, created with ``mode`` (so
    a private key is never readable by others, not even for an instant), flushed to
    disk, then renamed over ``path``.
    """
    ensure_home(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, mode)  # mkstemp creates 0600; widen (cert.pem) or keep (key.pem)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
