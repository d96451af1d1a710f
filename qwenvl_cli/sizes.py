"""Sizes as people write them (2GB, 500MB, 1.5GiB) read into bytes."""

from __future__ import annotations

from .errors import QwenvlError


def parse_size(size: str | int) -> int:
    """Bytes from a size like 2GB (10**9), 500MB, 1.5GiB (2**30) or a plain number of bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    text = str(size).strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    factor = 1
    for suffix, scale in units:
        if text.endswith(suffix):
            text, factor = text[: -len(suffix)].strip(), scale
            break
    try:
        value = int(float(text) * factor)
    except (ValueError, OverflowError):  # not a number, or inf
        value = 0
    if value <= 0:
        raise QwenvlError(f"cannot read the size {size!r}", "Write it like 2GB, 500MB, 1.5GiB or 1000000 (bytes)")
    return value
