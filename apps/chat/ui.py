"""The terminal interface (prompt-toolkit): messages print above the input line,
a bottom toolbar shows what is pending and the status, Tab completes commands,
nicks and rooms, a mention is highlighted and rings the terminal bell.

What the terminal's scrollback gets is chat lines only. Lines are printed above the
prompt by erasing the prompt, writing them and drawing it again, all in one step of
the event loop: prompt-toolkit's ``run_in_terminal`` would switch the terminal to
cooked mode meanwhile, and the keys typed in that moment would be echoed into the
scrollback. And no erase starts at the screen's top-left corner, where tmux (its
``scroll-on-clear``) and some terminals save the screen into the scrollback first:
the stale copies of the prompt and toolbar that a tall input (a paste) left behind.

:func:`render` (a Line to styled fragments) is pure; :class:`ChatUI` is the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.application import get_app_or_none
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText, StyleAndTextTuples
from prompt_toolkit.output.vt100 import Vt100_Output
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.renderer import print_formatted_text as print_fragments
from prompt_toolkit.styles import Style
from prompt_toolkit.validation import ValidationError, Validator

from . import protocol
from .client import COMMANDS, ChatClient, Line, check_input, paste_lines
from .sanitize import clean

if TYPE_CHECKING:
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output

#: Seconds /quit waits for lines in flight on a live link before asking.
QUIT_GRACE = 1.0

__all__ = [
    "STYLE",
    "ChatCompleter",
    "ChatUI",
    "InputCheck",
    "ScrollbackSafeOutput",
    "render",
    "terminal_output",
]

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
    """Tab completes commands, then nicks of the current room, and #rooms: every room
    the hub knows, not only those joined (the list is refreshed as Tab is pressed)."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    async def get_completions_async(
        self, document: Document, complete_event: CompleteEvent
    ) -> AsyncGenerator[Completion, None]:
        if document.get_word_before_cursor(WORD=True).startswith("#"):
            await self.client.refresh_rooms()
        for completion in self.get_completions(document, complete_event):
            yield completion

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        before = document.text_before_cursor
        word = document.get_word_before_cursor(WORD=True)
        if before.startswith("/") and " " not in before:
            for name in COMMANDS:
                if name.startswith(before.lower()):
                    yield Completion(name + " ", start_position=-len(before), display=name)
            return
        if word.startswith("#"):
            rooms = set(self.client.rooms) | set(self.client.members) | self.client.known_rooms
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


class InputCheck(Validator):
    """Enter on a line that cannot be sent keeps it in the input, with the reason."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    def validate(self, document: Document) -> None:
        text = document.text
        reason = check_input(text)
        is_text = paste_lines(text) is not None or not text.startswith("/") or text.startswith("//")
        if not reason and is_text and text.strip() and self.client.current is None:
            reason = "you are in no room: /join one first (what you typed is kept)"
        if reason:
            raise ValidationError(cursor_position=document.cursor_position, message=reason)


class ScrollbackSafeOutput(Vt100_Output):
    """A VT100 output whose "erase down" never starts at the top-left corner (see the
    module docstring): it clears the rest of the current line, then the screen from
    the next line down, and puts the cursor back."""

    def erase_down(self) -> None:
        self.write_raw("\x1b[K\x1b7\x1b[E\x1b[J\x1b8")


def terminal_output() -> Output | None:
    """The output for a real terminal (None: let prompt-toolkit choose)."""
    if sys.platform == "win32" or not sys.stdout.isatty():
        return None
    return ScrollbackSafeOutput.from_pty(sys.stdout, term=os.environ.get("TERM"))


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
            output=output or terminal_output(),
            completer=ChatCompleter(client),
            validator=InputCheck(client),
            validate_while_typing=False,
            bottom_toolbar=self.toolbar,
            style=STYLE,
            refresh_interval=1.0,
            complete_while_typing=False,
            erase_when_done=True,  # at quit: the scrollback keeps no prompt
        )
        # One prompt for the whole session: Enter hands the line over and clears the
        # input, the prompt never ends. Between two prompts the terminal would be back in
        # cooked mode, and keys typed in that instant would be echoed into the scrollback.
        self.session.default_buffer.accept_handler = self._accept
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unprinted: list[list[tuple[str, str]]] = []
        self._ring = False
        self._printer: asyncio.Task[None] | None = None
        self._quit_asked = False

    def prompt(self) -> StyleAndTextTuples:
        room = protocol.display_room(self.client.current) if self.client.current else ""
        return [("class:room", f"{room}"), ("", "> ")]

    def toolbar(self) -> StyleAndTextTuples:
        frags: StyleAndTextTuples = []
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

    # ------------------------------------------------------------------ printing

    def show(self, line: Line) -> None:
        """Print a line above the prompt (batched: many lines at once cost one redraw)."""
        self._unprinted.append(render(line, self.client.current))
        self._ring = self._ring or (line.mention and self.bell)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (yet): nothing is drawn to step around
            self._print_now()
            return
        if self._printer is None or self._printer.done():
            self._printer = loop.create_task(self._print_above())

    async def _print_above(self) -> None:
        while self._unprinted:
            app = get_app_or_none()
            if app is not None and app.is_running and app.renderer.waiting_for_cpr:
                # the terminal is telling where the cursor is: printing now would make the
                # prompt's idea of the space below it wrong
                await app.renderer.wait_for_cpr_responses()
            self._print_now()

    def _print_now(self) -> None:
        batch, self._unprinted = self._unprinted, []
        ring, self._ring = self._ring, False
        app = get_app_or_none()
        drawn = app is not None and app.is_running and not app.is_done
        # (prompt-toolkit has no public flag for "a run_in_terminal is under way": the
        # prompt is erased then, and printing straight away is right)
        if app is None or not drawn or getattr(app, "_running_in_terminal", False):
            for frags in batch:
                print_formatted_text(FormattedText(frags), style=STYLE, output=self.session.output)
            return
        # One synchronous step: erase the prompt, print, draw it again (next iteration).
        output = app.output
        app.renderer.erase(leave_alternate_screen=False)
        for frags in batch:
            print_fragments(output, [*frags, ("", "\n")], STYLE)
        if ring:
            output.bell()
        output.flush()
        app.renderer.request_absolute_cursor_position()
        app.invalidate()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Read lines until /quit (asked once when lines are undelivered), Ctrl-D or Ctrl-C."""
        try:
            with patch_stdout(raw=True):
                while True:
                    try:
                        await self.session.prompt_async(self.prompt)
                        return  # only a quit ends the prompt
                    except (EOFError, KeyboardInterrupt):
                        if await self._may_quit(force=False):
                            return
        finally:
            for task in self._tasks:
                task.cancel()
            if self._unprinted:
                self._print_now()

    def _accept(self, buffer: Buffer) -> bool:
        """Enter on a valid input: act on it; False clears the input."""
        text = buffer.text
        force = _quit_command(text)
        if force is not None:
            self._spawn(self._quit(force))
        else:
            # A command may wait for the hub (while reconnecting, say): never block typing.
            self._spawn(self.client.handle_input(text))
        return False

    async def _quit(self, force: bool) -> None:
        if await self._may_quit(force):
            app = get_app_or_none()
            if app is not None and app.is_running and not app.is_done:
                app.exit(result="")

    async def _may_quit(self, force: bool) -> bool:
        """Whether to quit now: yes, unless lines typed have not reached the hub, in
        which case the user is told once (a second /quit, or /quit --force, drops them)."""
        client = self.client
        if client.undelivered and client.state == "connected":
            with contextlib.suppress(TimeoutError):  # in flight: a moment is enough
                await client.wait_for(lambda c: not c.undelivered, QUIT_GRACE)
        count = client.undelivered
        if not count or force or self._quit_asked:
            return True
        self._quit_asked = True
        lines = "1 line" if count == 1 else f"{count} lines"
        client.notice(f"{lines} not yet delivered; /quit again to drop them, or wait")
        self._spawn(self._tell_when_delivered())
        return False

    async def _tell_when_delivered(self) -> None:
        await self.client.wait_for(lambda c: not c.undelivered, timeout=None)
        self._quit_asked = False
        self.client.notice("everything you typed is delivered: /quit leaves now")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _quit_command(text: str) -> bool | None:
    """None: not a quit; else whether it is forced (``/quit --force``)."""
    if paste_lines(text) is not None:
        return None  # a paste is text, whatever its first line says
    word, *rest = text.strip().split() or [""]
    word = word.lower()
    if (
        len(word) >= 2
        and "/quit".startswith(word)
        and not any(c.startswith(word) for c in COMMANDS if c != "/quit")
    ):
        return "--force" in rest
    return None
