"""Rendering of `qwenvl profile`: a rich progress bar over cells, the table (laid out like the upstream
README's: rows are methods, columns are lengths, cells `memory / s/it`), Markdown, and a PNG chart."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..profile import ProfileCell, ProfileResult


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


SYNC_SITES_SHOWN = 5  # under the table; the JSON has them all


def _traces(result: ProfileResult) -> list[str]:
    """One line per traced cell (`--trace`)."""
    lines = []
    for cell in result.cells + result.baseline_cells:
        if cell.trace is not None:
            recipe = " (upstream)" if cell.recipe == "upstream" else ""
            lines.append(f"trace {cell.method} {cell.length}{recipe}: {cell.trace.line()} → {cell.trace.file}")
            for site in cell.trace.sync_sites[:SYNC_SITES_SHOWN]:
                op = site.operator.removeprefix("aten::")
                lines.append(f"  host sync {cell.method} {cell.length}{recipe}: {site.calls} × {op} ← {site.where}")
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
    if result.picture is not None:
        console.print(escape(result.picture.line()))
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
    for line in _traces(result):
        console.print(escape(line))
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
    if result.picture is not None:
        lines += ["", result.picture.line() + "."]
    if result.ratios:
        lines += ["", "Against `--recipe upstream` (qwenvl ÷ upstream; below 1 is better):", ""]
        lines += ["| method | length | s/it | memory |", "|---|---|---|---|"]
        for ratio in result.ratios:
            speed = "—" if ratio.seconds_per_step_vs_upstream is None else f"×{ratio.seconds_per_step_vs_upstream}"
            memory = "—" if ratio.memory_vs_upstream is None else f"×{ratio.memory_vs_upstream}"
            lines.append(f"| {ratio.method} | {ratio.length} | {speed} | {memory} |")
    if result.gpu_memory_gib is not None:
        lines += ["", f"✓ fits / ✗ does not fit in {result.gpu_memory_gib:g} GiB."]
    extra = _traces(result) + result.notes + _reasons(result)
    if extra:
        lines += [""] + [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"


def profile_chart_data(result: ProfileResult) -> tuple[dict, dict]:
    """`ProfileResult` as the plain data of `charts.profile_figure`: (series, keyword options)."""

    def points(baseline: bool) -> dict[str, list[tuple[int, float | None, float | None]]]:
        series = {}
        for method in result.methods:
            cells = [result.cell(method, length, baseline) for length in result.lengths]
            cells = [cell for cell in cells if cell is not None]
            if cells:
                series[method] = [
                    (cell.length, cell.memory_gib, cell.seconds_per_step)
                    if cell.status == "ok"
                    else (cell.length, None, None)
                    for cell in cells
                ]
        return series

    def reasons(cells: list[ProfileCell]) -> dict[str, dict[int, str]]:
        found: dict[str, dict[int, str]] = {}
        for cell in cells:
            if cell.status != "ok":
                found.setdefault(cell.method, {})[cell.length] = cell_text(cell)
        return found

    options = {
        "title": f"qwenvl profile: {result.model} on {result.device}",
        "caption": _caption(result),
        "failures": reasons(result.cells),
        "baselines": points(True),
        "baseline_failures": reasons(result.baseline_cells),
        "memory_limit_gib": result.gpu_memory_gib,
    }
    return points(False), options


def profile_png(result: ProfileResult, path: str | Path) -> Path:
    """Two panels, memory and s/it against length, one line per method (the upstream recipe's cells dashed),
    cells without a value marked with their status, the GPU memory as a line, the caption below (matplotlib)."""
    from ..charts import profile_chart_png

    series, options = profile_chart_data(result)
    return profile_chart_png(series, path, **options)
