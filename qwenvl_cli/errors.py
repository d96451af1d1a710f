"""The one exception type a user should ever see: what went wrong, and what to do about it."""

from __future__ import annotations


class QwenvlError(Exception):
    """An expected mistake (bad input, missing file, refused combination).

    The CLI prints `message` and `fix` as one paragraph and exits with `exit_code`, without a
    traceback. Services raise it; they never print.
    """

    def __init__(self, message: str, fix: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message}. {self.fix}" if self.fix else self.message
