"""Plain helpers for tests (import with `from helpers import make_sample`)."""

from __future__ import annotations


def make_sample(sample_id: str = "s0", *turns: str, roles: tuple[str, ...] | None = None) -> dict:
    """A sample with alternating user/assistant turns (or the given roles)."""
    turns = turns or ("Hello", "Hi!")
    roles = roles or tuple("user" if i % 2 == 0 else "assistant" for i in range(len(turns)))
    return {"id": sample_id, "conversations": [{"from": r, "value": v} for r, v in zip(roles, turns, strict=True)]}
