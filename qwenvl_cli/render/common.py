"""What every command shares when it draws: the one-paragraph error (the thing and the fix)."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from ..errors import QwenvlError
from ..schemas import Severity

SEVERITY_STYLE = {Severity.error: "bold red", Severity.warning: "yellow"}


def print_error(console: Console, error: QwenvlError) -> None:
    text = Text()
    text.append("error: ", style="bold red")
    text.append(error.message.rstrip("."))
    text.append(".")
    if error.fix:
        text.append(" " + error.fix.rstrip(".") + ".")
    console.print(text, soft_wrap=False)
