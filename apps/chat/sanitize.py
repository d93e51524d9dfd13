"""Neutralise text from peers before it reaches the terminal.

Anything a peer sends (message text, nicks, away messages, even room names from a
hostile hub) goes through :func:`clean` before display. A terminal obeys control
characters wherever they appear, so instead of trusting the hub's checks we make
every control visible and inert:

* C0 controls (``\\x00``-``\\x1f``) and DEL become caret notation (``^[`` for ESC,
  ``^G`` for BEL): an escape sequence turns into harmless text such as ``^[[2J``;
* C1 controls (``\\x80``-``\\x9f``, among them the 8-bit CSI ``\\x9b``) become ``<U+009B>``;
* bidirectional overrides and isolates (the "Trojan Source" characters), which make
  a terminal show text in another order than it was written, become ``<U+202E>``;
* a line break becomes ``⏎`` so one message is always one line.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["BIDI_CONTROLS", "clean", "is_clean"]

#: Embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) and the marks.
BIDI_CONTROLS: Final = frozenset(
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)
)


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _visible(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r":
        return "⏎"
    if ch == "\t":
        return " "
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    return f"<U+{code:04X}>"


def _needs_escape(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F or ch in BIDI_CONTROLS


# A translation table built once: str.translate is the fast path for the common case.
_TABLE: Final = {code: _visible(chr(code)) for code in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord(ch): _visible(ch) for ch in BIDI_CONTROLS
}


def clean(text: object, limit: int | None = None) -> str:
    """Return ``text`` safe to print on a terminal (see the module docstring).

    Args:
        text: anything; non-strings are shown by their ``repr`` (a hostile peer may
            send a number where text belongs).
        limit: cut the result to this many characters, marked with ``…``.
    """
    if not isinstance(text, str):
        text = repr(text)
    result = text.translate(_TABLE)
    if not result.isascii():
        # Lone surrogates cannot be encoded for the terminal; show them like controls.
        result = _SURROGATE.sub(lambda m: f"<U+{ord(m.group()):04X}>", result)
    if limit is not None and len(result) > limit:
        result = result[: max(0, limit - 1)] + "…"
    return result


def is_clean(text: str) -> bool:
    """Whether ``text`` holds nothing :func:`clean` would change (no control at all)."""
    return not any(_needs_escape(c) for c in text) and not _SURROGATE.search(text)
