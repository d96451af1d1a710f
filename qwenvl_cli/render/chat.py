"""What `qwenvl chat` shows: the interactive loop (streamed answers, slash commands, Ctrl-C to stop an
answer), one-shot answers, and the boxes of grounded answers."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..chat import ChatAnswer, Conversation
from ..errors import QwenvlError
from ..schemas import GenerationSettings

HELP = """commands:
  /image PATH|URL   attach a picture to your next message (several: repeat)
  /clear            forget the conversation (pictures are numbered from 1 again)
  /history          show the conversation so far
  /regen            answer the last question again
  /save FILE        save the conversation as training data (JSON, the data format)
  /system TEXT      change the system prompt (the conversation is kept)
  /exit             leave (or Ctrl-D)
Ctrl-C stops an answer being written; the session goes on."""


def render_boxes(result: ChatAnswer, console: Console) -> None:
    if not result.boxes:
        return
    table = Table(box=None, padding=(0, 2), show_edge=False, title_justify="left")
    table.add_column("box")
    table.add_column("ref")
    table.add_column("pixels (x1, y1, x2, y2)")
    table.add_column("normalised /1000")
    for index, box in enumerate(result.boxes, 1):
        table.add_row(str(index), escape(box.ref or "—"), ", ".join(map(str, box.box_pixels)), str(box.box_norm1000))
    console.print(table)
    if result.image_with_boxes:
        console.print(f"[green]boxes drawn on {escape(result.picture or '')}[/]: {escape(result.image_with_boxes)}")


def stream_answer(pieces, console: Console) -> tuple[str, bool]:
    """Print pieces as they come; (text, stopped) — stopped when Ctrl-C ended the answer early."""
    text = []
    try:
        for piece in pieces:
            console.out(piece, end="", highlight=False)
            console.file.flush()
            text.append(piece)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            pieces.close()
        console.print("\n[yellow](stopped)[/]")
        return "".join(text), True
    console.out("")
    return "".join(text), False


def chat_loop(
    conversation: Conversation, settings: GenerationSettings, console: Console, save_dir: Path, title: str
) -> None:
    """The interactive chat until /exit or end of input."""
    console.print(f"[bold]qwenvl chat[/] · {escape(title)}")
    console.print("[dim]/help for commands · /image PATH to add a picture · Ctrl-C stops an answer · /exit[/]")
    while True:
        try:
            pending = f" [dim]({len(conversation.pending)} picture(s) attached)[/]" if conversation.pending else ""
            line = console.input(f"[bold cyan]you[/]{pending} › ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim](type /exit or press Ctrl-D to leave)[/]")
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if _command(line, conversation, settings, console, save_dir):
                    return
                continue
            console.print("[bold magenta]qwen[/] › ", end="")
            _, stopped = stream_answer(conversation.stream(line, settings), console)
            if not stopped:
                render_boxes(conversation.grounding(conversation.session.history[-1][1], save_dir), console)
        except QwenvlError as exc:
            console.print(f"[red]error[/]: {escape(str(exc))}")


def _command(line: str, conversation: Conversation, settings, console: Console, save_dir: Path) -> bool:
    """Run a slash command; True when the session should end."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        console.print(HELP, highlight=False)
    elif name == "/image":
        if not argument:
            raise QwenvlError("/image needs a path or URL", "Type /image photos/cat.jpg")
        conversation.attach(argument)
        number = len(conversation.pictures()) + len(conversation.pending)
        console.print(f"[green]Picture {number}[/] attached: {escape(argument)} (sent with your next message)")
    elif name == "/clear":
        conversation.clear()
        console.print("[dim]conversation cleared[/]")
    elif name == "/history":
        if not conversation.session.history:
            console.print("[dim](no exchanges yet)[/]")
        for index, (query, answer) in enumerate(conversation.session.history, 1):
            console.print(f"[bold cyan]{index}. you[/] › {escape(query)}")
            console.print(f"[bold magenta]{index}. qwen[/] › {escape(answer)}")
    elif name == "/regen":
        console.print("[bold magenta]qwen[/] › ", end="")
        _, stopped = stream_answer(conversation.regenerate(settings), console)
        if not stopped:
            render_boxes(conversation.grounding(conversation.session.history[-1][1], save_dir), console)
    elif name == "/save":
        if not argument:
            raise QwenvlError("/save needs a file name", "Type /save chat.json")
        console.print(f"[green]saved[/] {escape(str(conversation.save(Path(argument))))}")
    elif name == "/system":
        if not argument:
            console.print(f"system prompt: {escape(conversation.system)}")
        else:
            conversation.set_system(argument)
            console.print("[green]system prompt set[/]")
    else:
        raise QwenvlError(f"unknown command {name}", "Type /help for the list")
    return False
