"""The wire layer: frames and the buffer they are parsed from. No I/O here."""

from __future__ import annotations

from .buffer import FrameDecoder
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    PREFACE,
    Frame,
    FrameType,
    MessageFlags,
    MessageFrame,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "PREFACE",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "MessageFlags",
    "MessageFrame",
]
