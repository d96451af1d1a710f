"""A loss-curve PNG drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 400, 56


def loss_curve_png(points: Sequence[tuple[float, float]], path: str | Path, title: str = "training loss") -> Path:
    """Plot (step, loss) points: axes with min/max labels, the curve, and the last value."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2 + 10, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    draw.text((left, 8), title, fill=(0, 0, 0))
    steps = [float(s) for s, _ in points]
    losses = [float(v) for _, v in points]
    low, high = min(losses), max(losses)
    if high == low:
        high, low = high + 0.5, low - 0.5
    first, last = min(steps), max(steps)
    span = (last - first) or 1.0

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - first) / span * (right - left), bottom - (loss - low) / (high - low) * (bottom - top))

    for fraction in (0.25, 0.5, 0.75):
        y = top + fraction * (bottom - top)
        draw.line((left, y, right, y), fill=(230, 230, 230))
    line = [xy(s, v) for s, v in zip(steps, losses, strict=True)]
    if len(line) > 1:
        draw.line(line, fill=(31, 119, 180), width=2)
    for x, y in line[-1:]:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(214, 39, 40))
    draw.text((4, top - 6), f"{high:.3g}", fill=(80, 80, 80))
    draw.text((4, bottom - 6), f"{low:.3g}", fill=(80, 80, 80))
    draw.text((left, bottom + 8), f"step {first:g}", fill=(80, 80, 80))
    draw.text((right - 70, bottom + 8), f"step {last:g}", fill=(80, 80, 80))
    draw.text((right - 150, top + 6), f"last loss {losses[-1]:.4f}", fill=(214, 39, 40))
    image.save(path)
    return Path(path)
