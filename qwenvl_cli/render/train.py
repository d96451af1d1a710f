"""What `qwenvl train` shows: the progress bar (loss, lr, tokens/s, memory, ETA) and the run's summary."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


@contextmanager
def train_progress(console: Console):
    """An `(event, payload)` hook for `run_training` that shows a progress bar with loss, lr, tokens/s,
    ETA and memory; off a terminal it prints one line per logged step."""
    progress = None
    task = None
    if console.is_terminal:
        progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    def hook(event: str, payload: dict) -> None:
        nonlocal task
        if event == "start":
            for note in payload["notes"]:
                console.print(f"[yellow]note[/]: {note}")
            if payload["dropped"]:
                console.print(f"[yellow]note[/]: {payload['dropped']} samples longer than --max-length were dropped")
            if payload["resume"]:
                console.print(f"resuming from {payload['resume']}")
        elif event == "steps" and progress is not None:
            task = progress.add_task("train", total=payload["total"], completed=payload["done"], stats="")
        elif event == "log":
            stats = (
                f"loss {payload['loss']:.4f} · lr {payload['lr'] or 0:.2e} · "
                f"{payload['tokens_per_s']:,.0f} tok/s · {payload['memory']}"
            )
            if progress is not None and task is not None:
                progress.update(task, completed=payload["step"], stats=stats)
            else:
                console.print(f"step {payload['step']}/{payload['total']} · {stats}")
        elif event == "save":
            console.print(f"[dim]checkpoint at step {payload['step']}[/]")
        elif event == "eval":
            console.print(f"eval at step {payload['step']}: {_eval_text(payload)}")

    if progress is None:
        yield hook
    else:
        with progress:
            yield hook


def render_train_result(result, console: Console, command: str | None = None) -> None:
    table = Table(box=None, show_header=False, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths and the command wrap, never cut
    rows = [
        ("method", f"{result.method} ({result.precision}, {result.engine})"),
        ("model", result.model),
        (
            "data",
            f"{result.data}: {result.samples:,} samples"
            + (f", {result.dropped_samples} dropped as too long" if result.dropped_samples else "")
            + (f", {result.skipped_invalid} invalid skipped" if result.skipped_invalid else ""),
        ),
        (
            "parameters",
            f"{result.trainable_parameters:,} trainable of {result.total_parameters:,} "
            f"({100 * result.trainable_parameters / max(result.total_parameters, 1):.2f} %)",
        ),
        ("memory floor", f"{result.weights_gib:.2f} GiB for weights, gradients and optimizer states"),
    ]
    if result.dry_run:
        for note in result.notes:
            rows.append(("note", note))
        rows.append(("output", result.output))
        if command:
            rows.append(("command", command))
        for key, value in rows:
            table.add_row(key, escape(str(value)))
        console.print("[bold]qwenvl train --dry-run[/]: the plan, nothing loaded or written")
        console.print(table)
        return
    rows += [
        (
            "steps",
            f"{result.global_step:,}" + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""),
        ),
        ("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "—"),
        (
            "time",
            f"{result.seconds:.1f} s · {result.samples_per_second or 0:,.2f} samples/s · "
            f"{result.tokens_per_second or 0:,.0f} tokens/s"
            + (f" · {result.padding_share:.0%} padding" if result.padding_share else ""),
        ),
        ("output", result.output),
    ]
    if result.evaluations:
        rows.append(("last eval", f"step {result.evaluations[-1]['step']}: {_eval_text(result.evaluations[-1])}"))
    if result.loss_curve:
        rows.append(("loss curve", result.loss_curve))
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    console.print("[bold green]✓[/] training finished")
    console.print(table)


def _eval_text(record: dict) -> str:
    def pct(value):
        return "—" if value is None else f"{100 * value:.1f} %"

    loss = record.get("eval_loss")
    return (f"loss {loss:.4f}" if loss is not None else "loss —") + (
        f" · exact match {pct(record.get('exact_match'))} · Acc@0.5 {pct(record.get('acc_at_50'))}"
        f" ({record.get('questions', 0)} questions)"
    )
