"""The terminal interface (prompt-toolkit): messages print above the input line,
a bottom toolbar shows what is pending and the status, Tab completes commands,
nicks and rooms, a mention is highlighted and rings the terminal bell.

:func:`render` (a Line to styled fragments) is pure; :class:`ChatUI` is the I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.application import get_app_or_none
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from . import protocol
from .client import COMMANDS, ChatClient, Line
from .sanitize import clean

if TYPE_CHECKING:
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output

__all__ = ["STYLE", "ChatCompleter", "ChatUI", "render"]

STYLE = Style.from_dict(
    {
        "time": "#888888",
        "room": "#5f87af",
        "nick": "bold #5fafd7",
        "nick.own": "bold #87af5f",
        "text": "",
        "me": "italic #d7af5f",
        "mention": "bold bg:#5f0000 #ffffff",
        "history": "#808080",
        "dm": "#d787d7",
        "event": "#808080",
        "marker": "bold #ffaf00",
        "info": "#5fafaf",
        "error": "bold #ff5f5f",
        "pending": "#808080 italic",
        "bottom-toolbar": "noreverse bg:#303030 #d0d0d0",
        "bottom-toolbar.status": "bold",
    }
)


def _clock(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "--:--"
    try:
        return time.strftime("%H:%M", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return "--:--"


def render(line: Line, current: str | None) -> list[tuple[str, str]]:
    """The styled fragments of one line (its strings were sanitised by the client)."""
    kind = line.kind
    if kind in ("msg", "history"):
        frags: list[tuple[str, str]] = [("class:time", _clock(line.ts) + " ")]
        if line.room and line.room != current:
            frags.append(("class:room", f"[{protocol.display_room(line.room)}] "))
        nick_style = "class:nick.own" if line.own else "class:nick"
        body_style = "class:mention" if line.mention else "class:text"
        if kind == "history":
            nick_style = body_style = "class:history"
        if line.me:
            frags += [
                ("class:me", f"* {line.nick} "),
                (body_style if line.mention else "class:me", line.text),
            ]
        else:
            frags += [(nick_style, f"<{line.nick}> "), (body_style, line.text)]
        return frags
    if kind == "dm":
        return [
            ("class:time", _clock(line.ts) + " "),
            ("class:dm", f"[dm] <{line.nick}> " if not line.me else f"[dm] * {line.nick} "),
            ("class:dm", line.text),
        ]
    if kind == "event":
        where = ""
        return [("class:event", f"-- {line.text}{where}")]
    if kind == "marker":
        return [("class:marker", line.text)]
    if kind == "error":
        return [("class:error", f"! {line.text}")]
    return [("class:info", line.text)]


def plain(line: Line, current: str | None) -> str:
    """A line as plain text (what the terminal shows, without colours)."""
    return "".join(text for _, text in render(line, current))


class ChatCompleter(Completer):
    """Tab completes commands, then nicks of the current room, and #rooms."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        before = document.text_before_cursor
        word = document.get_word_before_cursor(WORD=True)
        if before.startswith("/") and " " not in before:
            for name in COMMANDS:
                if name.startswith(before.lower()):
                    yield Completion(name + " ", start_position=-len(before), display=name)
            return
        if word.startswith("#"):
            rooms = set(self.client.rooms) | set(self.client.members)
            for room in sorted(rooms):
                name = protocol.display_room(room)
                if name.startswith(word.lower()):
                    yield Completion(name, start_position=-len(word))
            return
        nicks: set[str] = set()
        if self.client.current:
            nicks |= self.client.members.get(self.client.current, set())
        for names in self.client.members.values():
            nicks |= names
        at_start = before.strip() == word
        for nick in sorted(nicks, key=str.casefold):
            if nick and nick.casefold().startswith(word.casefold()) and nick != self.client.nick:
                shown = clean(nick)
                yield Completion(
                    shown + (": " if at_start else " "), start_position=-len(word), display=shown
                )


class ChatUI:
    """The interactive session: a PromptSession in patch_stdout, fed by a ChatClient."""

    def __init__(
        self,
        client: ChatClient,
        *,
        bell: bool = True,
        input: Input | None = None,
        output: Output | None = None,
    ) -> None:
        self.client = client
        self.bell = bell
        client.listeners.append(self.show)
        client.on_status = self.refresh
        self.session: PromptSession[str] = PromptSession(
            input=input,
            output=output,
            completer=ChatCompleter(client),
            bottom_toolbar=self.toolbar,
            style=STYLE,
            refresh_interval=1.0,
            complete_while_typing=False,
            erase_when_done=True,  # the line comes back from the hub, in its place in the order
        )
        self._tasks: set[asyncio.Task[Any]] = set()

    def prompt(self) -> list[tuple[str, str]]:
        room = protocol.display_room(self.client.current) if self.client.current else ""
        return [("class:room", f"{room}"), ("", "> ")]

    def toolbar(self) -> list[tuple[str, str]]:
        frags: list[tuple[str, str]] = []
        pending = list(self.client.pending.values())
        for item in pending[:3]:
            where = f"→{item.to}" if item.to else protocol.display_room(item.room or "")
            frags.append(("class:pending", f" ⧗ {clean(where)} {clean(item.text, 70)}\n"))
        if len(pending) > 3:
            frags.append(("class:pending", f" ⧗ … and {len(pending) - 3} more\n"))
        frags.append(("class:bottom-toolbar.status", f" {self.client.status} "))
        return frags

    def refresh(self) -> None:
        app = get_app_or_none()
        if app is not None and app.is_running:
            app.invalidate()

    def show(self, line: Line) -> None:
        print_formatted_text(FormattedText(render(line, self.client.current)), style=STYLE)
        if line.mention and self.bell:
            app = get_app_or_none()
            if app is not None and app.is_running:
                app.output.bell()
                app.output.flush()

    async def run(self) -> None:
        """Read lines until /quit, Ctrl-D or Ctrl-C."""
        with patch_stdout(raw=True):
            while True:
                try:
                    text = await self.session.prompt_async(self.prompt)
                except (EOFError, KeyboardInterrupt):
                    return
                if _is_quit(text):
                    return
                # A command may wait for the hub (while reconnecting, say): never block typing.
                task = asyncio.get_running_loop().create_task(self.client.handle_input(text))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


def _is_quit(text: str) -> bool:
    word = text.strip().split(" ", 1)[0].lower()
    return (
        len(word) >= 2
        and "/quit".startswith(word)
        and not any(c.startswith(word) for c in COMMANDS if c != "/quit")
    )
