"""Rendering of `qwenvl profile`: a rich progress bar over cells, the table (laid out like the upstream
README's: rows are methods, columns are lengths, cells `memory / s/it`), Markdown, and a PNG chart."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..profile import ProfileCell, ProfileResult

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


@contextlib.contextmanager
def profile_progress(console: Console):
    """A progress bar over the grid's cells (drawn on a terminal only; the hook works everywhere)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = None

    def hook(kind: str, payload: dict) -> None:
        nonlocal task
        if kind == "start":
            task = progress.add_task("profiling", total=payload["total"])
        elif kind == "cell" and task is not None:
            progress.update(task, description=f"profiling {escape(payload['label'])}")
        elif kind == "done" and task is not None:
            progress.advance(task)

    with progress:
        yield hook


def cell_text(cell: ProfileCell | None) -> str:
    if cell is None:
        return "—"
    if cell.status == "ok":
        return f"{cell.memory_gib:.1f}G / {cell.seconds_per_step:.2f}s/it"
    return {"oom": "OOM", "failed": "failed", "skipped": "skipped"}[cell.status]


def _fits(cell: ProfileCell | None) -> str:
    if cell is None or cell.fits is None:
        return ""
    return " ✓" if cell.fits else " ✗"


def _reasons(result: ProfileResult) -> list[str]:
    lines = []
    for cell in result.cells + result.baseline_cells:
        if cell.status != "ok":
            recipe = " (upstream)" if cell.recipe == "upstream" else ""
            lines.append(f"{cell.method} {cell.length}{recipe}: {cell.status}: {cell.reason}")
    return lines


def _caption(result: ProfileResult) -> str:
    return (
        f"{result.model} on {result.device}; batch size {result.batch_size}, gradient accumulation "
        f"{result.grad_accum}, one picture per sample, gradient checkpointing "
        f"{'on' if result.gradient_checkpointing else 'off'}{', torch.compile' if result.compile else ''}; "
        f"s/it over {result.steps} optimizer steps after {result.warmup} warmup; memory: {result.memory_kind}"
    )


def render_profile(result: ProfileResult, console: Console) -> None:
    table = Table(title="memory / speed of one optimizer step", caption=escape(_caption(result)))
    table.add_column("method")
    for length in result.lengths:
        table.add_column(str(length), justify="center")
    for method in result.methods:
        row = [method]
        for length in result.lengths:
            cell = result.cell(method, length)
            text = cell_text(cell) + _fits(cell)
            if cell is not None and cell.mfu is not None:
                text += f"\nMFU {cell.mfu:.0%}"
            row.append(text)
        table.add_row(*row)
    console.print(table)
    if result.ratios:
        ratios = Table(title="against --recipe upstream (qwenvl ÷ upstream; below 1 is better)")
        ratios.add_column("method")
        for length in result.lengths:
            ratios.add_column(str(length), justify="center")
        for method in result.methods:
            row = [method]
            for length in result.lengths:
                ratio = next((r for r in result.ratios if r.method == method and r.length == length), None)
                if ratio is None or ratio.seconds_per_step_vs_upstream is None:
                    row.append("—")
                else:
                    row.append(f"s/it ×{ratio.seconds_per_step_vs_upstream:.2f}, mem ×{ratio.memory_vs_upstream:.2f}")
            ratios.add_row(*row)
        console.print(ratios)
    if result.gpu_memory_gib is not None:
        console.print(f"✓ fits / ✗ does not fit in {result.gpu_memory_gib:g} GiB ({result.memory_kind})")
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    for line in _reasons(result):
        console.print(f"[yellow]{escape(line)}[/]")


def profile_markdown(result: ProfileResult) -> str:
    lines = [
        "# qwenvl profile",
        "",
        _caption(result) + ".",
        "",
        "| method | " + " | ".join(str(length) for length in result.lengths) + " |",
        "|---|" + "---|" * len(result.lengths),
    ]
    for method in result.methods:
        cells = [result.cell(method, length) for length in result.lengths]
        lines.append(f"| {method} | " + " | ".join(cell_text(c) + _fits(c) for c in cells) + " |")
    if result.ratios:
        lines += ["", "Against `--recipe upstream` (qwenvl ÷ upstream; below 1 is better):", ""]
        lines += ["| method | length | s/it | memory |", "|---|---|---|---|"]
        for ratio in result.ratios:
            speed = "—" if ratio.seconds_per_step_vs_upstream is None else f"×{ratio.seconds_per_step_vs_upstream}"
            memory = "—" if ratio.memory_vs_upstream is None else f"×{ratio.memory_vs_upstream}"
            lines.append(f"| {ratio.method} | {ratio.length} | {speed} | {memory} |")
    if result.gpu_memory_gib is not None:
        lines += ["", f"✓ fits / ✗ does not fit in {result.gpu_memory_gib:g} GiB."]
    extra = result.notes + _reasons(result)
    if extra:
        lines += [""] + [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"


def profile_png(result: ProfileResult, path: str | Path) -> Path:
    """Two panels, memory and s/it against length, one line per method (Pillow; no plotting library)."""
    from PIL import Image, ImageDraw

    width, height, margin = 960, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 8), f"qwenvl profile: {result.model} on {result.device}", fill=(0, 0, 0))
    lengths = result.lengths
    low_x, high_x = min(lengths), max(lengths)
    span_x = (high_x - low_x) or 1
    panels = (("memory (GiB)", "memory_gib"), ("s/it", "seconds_per_step"))
    panel_width = (width - 3 * margin) // 2
    for index, (title, key) in enumerate(panels):
        left = margin + index * (panel_width + margin)
        right, top, bottom = left + panel_width, 40, height - margin
        draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
        draw.text((left, top - 14), title, fill=(0, 0, 0))
        values = [getattr(c, key) for c in result.cells if c.status == "ok" and getattr(c, key) is not None] or [
            0.0,
            1.0,
        ]
        low, high = 0.0, max(values) * 1.1 or 1.0

        def xy(length: float, value: float, left=left, right=right, top=top, bottom=bottom, high=high, low=low):
            return (
                left + (length - low_x) / span_x * (right - left) if span_x else (left + right) / 2,
                bottom - (value - low) / (high - low) * (bottom - top),
            )

        for fraction in (0.25, 0.5, 0.75):
            y = top + fraction * (bottom - top)  # gridlines at quarters of the scale
            draw.line((left, y, right, y), fill=(230, 230, 230))
        for fraction in (0.0, 0.5):
            draw.text(
                (left - 50, top - 4 + fraction * (bottom - top)), f"{high * (1 - fraction):.3g}", fill=(80, 80, 80)
            )
        draw.text((left - 50, bottom - 6), "0", fill=(80, 80, 80))
        for length in lengths:
            x, _ = xy(length, 0)
            draw.text((x - 12, bottom + 6), str(length), fill=(80, 80, 80))
        draw.text(((left + right) // 2 - 30, bottom + 22), "tokens per sample", fill=(80, 80, 80))
        for number, method in enumerate(result.methods):
            colour = COLOURS[number % len(COLOURS)]
            points = [
                xy(c.length, getattr(c, key))
                for length in lengths
                if (c := result.cell(method, length)) is not None and c.status == "ok"
            ]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            if index == 0:  # the legend, in the header line: never over a curve
                x = width // 2 + 20 + 110 * number
                draw.line((x, 14, x + 16, 14), fill=colour, width=3)
                draw.text((x + 22, 8), method, fill=colour)
    image.save(path)
    return Path(path)
