"""What `qwenvl validate-data` shows: the progress bar, the counts per check, examples, lengths and the verdict."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..data.checks import CHECKS
from ..schemas import LengthStats, ValidationReport
from .common import SEVERITY_STYLE


@contextmanager
def progress_hook(console: Console):
    """A `(stage, done, total, detail)` callback that drives a rich progress bar; no-op off a terminal."""
    if not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[tuple[str, str], int] = {}

        def hook(stage: str, done: int, total: int, detail: str) -> None:
            key = (stage, detail)
            amount = f"{done / 2**20:,.1f}/{total / 2**20:,.1f} MiB" if stage == "read" else f"{done:,}/{total:,}"
            if key not in tasks:
                title = f"reading {detail}" if stage == "read" else f"checking {detail}"
                tasks[key] = progress.add_task(title, total=total, amount=amount)
            progress.update(tasks[key], completed=done, total=total, amount=amount)

        yield hook


def render_validation(report: ValidationReport, console: Console, examples: int = 3) -> None:
    files = ", ".join(Path(f.path).name for f in report.files)
    console.print(
        f"[bold]qwenvl validate-data[/] · {escape(files)} · {report.samples:,} samples · "
        f"{report.images_checked:,} images checked"
        + (f" · {report.urls_checked:,} URLs checked" if report.urls_checked else "")
        + f" · {report.elapsed_s:.2f} s"
    )
    if len(report.files) > 1:
        table = Table(box=None, padding=(0, 2), show_edge=False)
        for column in ("file", "format", "samples", "valid"):
            table.add_column(column, justify="right" if column in ("samples", "valid") else "left")
        for f in report.files:
            table.add_row(
                escape(f.path),
                f.format or "—",
                f"{f.samples:,}",
                f"{f.valid_samples:,}" if f.readable else "[red]unreadable[/]",
            )
        console.print(table)

    if report.findings:
        _render_counts(report, console)
        _render_examples(report, console, examples)
    if report.lengths is not None:
        _render_lengths(report.lengths, console)
    if report.urls_found and not report.urls_checked:
        console.print(f"[dim]{report.urls_found:,} image URLs were not fetched; add --check-urls to check them.[/]")
    _render_verdict(report, console)


def _render_counts(report: ValidationReport, console: Console) -> None:
    table = Table(title="Findings", title_justify="left", expand=False)
    table.add_column("code")
    table.add_column("check")
    table.add_column("severity")
    table.add_column("count", justify="right")
    table.add_column("meaning", overflow="fold", max_width=60)
    for code, count in report.counts.items():
        info = CHECKS[code]
        table.add_row(
            code,
            info.name,
            Text(info.severity.value, style=SEVERITY_STYLE[info.severity]),
            f"{count:,}",
            escape(info.meaning),
        )
    console.print(table)


def _render_examples(report: ValidationReport, console: Console, examples: int) -> None:
    groups: dict[str, list] = {code: [] for code in report.counts}
    for finding in report.findings:
        group = groups[finding.code]
        if len(group) < examples:
            group.append(finding)
    for code, findings in groups.items():
        if not findings:
            continue
        info = CHECKS[code]
        lines = []
        for f in findings:
            where = Path(f.file).name + (f":{f.line}" if f.line is not None else "")
            who = []
            if f.sample_id is not None:
                who.append(f"id {f.sample_id!r}")
            elif f.sample_index is not None:
                who.append(f"sample #{f.sample_index}")
            if f.field is not None:
                who.append(f.field)
            elif f.turn is not None:
                who.append(f"turn {f.turn}")
            head = Text(f"{where}  ", style="cyan")
            head.append(("  ".join(who) + "  ") if who else "", style="magenta")
            head.append(f.message)
            lines.append(head)
            if f.snippet:
                lines.append(Text(f"    {f.snippet}", style="dim"))
            if f.fix != info.fix:
                lines.append(Text(f"    fix: {f.fix}", style="green"))
        more = report.counts[code] - len(findings)
        if more > 0:
            lines.append(Text(f"… and {more:,} more (all of them with --format json)", style="dim"))
        lines.append(Text(f"fix: {info.fix}", style="green"))
        title = Text(f"{code} {info.name}", style=SEVERITY_STYLE[info.severity])
        console.print(Panel(Group(*lines), title=title, title_align="left", border_style="dim", expand=True))


def _render_lengths(stats: LengthStats, console: Console) -> None:
    console.print(
        f"[bold]Token lengths[/] (the model's template and picture tokens): min {stats.min:,} · "
        f"median {stats.median:,} · "
        f"p95 {stats.p95:,} · max {stats.max:,} · over --max-length {stats.max_length:,}: {stats.over_limit:,}"
    )
    peak = max((b.count for b in stats.histogram), default=0) or 1
    for b in stats.histogram:
        bar = "█" * max(1 if b.count else 0, round(30 * b.count / peak))
        over = b.low > stats.max_length
        style = "red" if over else "green"
        console.print(f"  {b.low:>6,}–{b.high:<6,} [{style}]{bar}[/] {b.count:,}")


def _render_verdict(report: ValidationReport, console: Console) -> None:
    bad = report.samples - report.valid_samples
    if report.exit_code == 0:
        warn = f" ({_plural(report.warnings, 'warning')})" if report.warnings else ""
        console.print(f"[bold green]✓[/] {report.samples:,} samples, no errors{warn}.")
    elif report.exit_code == 2:
        console.print("[bold red]✗[/] a data file could not be read; fix it and run again.")
    else:
        parts = [_plural(report.errors, "error")]
        if report.warnings:
            parts.append(_plural(report.warnings, "warning") + (" (fatal with --strict)" if report.strict else ""))
        console.print(f"[bold red]✗[/] {', '.join(parts)}: {bad:,} of {report.samples:,} samples are invalid.")
        if report.clean_output is None and report.valid_samples:
            console.print(f"  --output-clean FILE writes the {report.valid_samples:,} valid samples to a new file.")
    if report.clean_output is not None:
        console.print(f"  wrote {report.valid_samples:,} valid samples to {escape(report.clean_output)}")


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")
