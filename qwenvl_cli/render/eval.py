"""Rich rendering for `qwenvl data synth` and `qwenvl eval`: summary tables and a count progress bar."""

from __future__ import annotations

import re
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..data.synth import SynthSummary
from ..evaluate import EvalReport

_PICTURE = re.compile(r"Picture (\d+): <img>[^<]*</img>\n?")


@contextmanager
def count_progress(console: Console, title: str):
    """A `(done, total)` callback that drives a rich progress bar; None off a terminal."""
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn(f"[bold]{escape(title)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(title, total=None)

        def hook(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield hook


def render_synth(summary: SynthSummary, console: Console) -> None:
    console.print(
        f"[green]✓[/] wrote {summary.train_samples + summary.eval_samples:,} samples and {summary.pictures:,} "
        f"pictures ({summary.image_size}×{summary.image_size}, seed {summary.seed}) to "
        f"{escape(summary.output)} in {summary.elapsed_s:.2f} s"
    )
    table = Table(box=None, padding=(0, 2), show_edge=False)
    table.add_column("split")
    table.add_column("file")
    table.add_column("samples", justify="right")
    table.add_row("train", escape(summary.train_file), f"{summary.train_samples:,}")
    table.add_row("eval", escape(summary.eval_file), f"{summary.eval_samples:,}")
    console.print(table)
    asked = [(kind, count) for kind, count in summary.questions.items() if kind in summary.question_kinds]
    kinds = " · ".join(f"{kind} {count:,}" for kind, count in asked)
    console.print(f"  questions: {kinds}   (1–{summary.max_shapes} shapes per picture)")
    console.print(f"  next: qwenvl validate-data {escape(summary.train_file)}")


def _share(correct: int, n: int, rate: float | None) -> str:
    return "—" if rate is None else f"{rate:.1%}  ({correct:,}/{n:,})"


def _short(text: str, width: int = 60) -> str:
    text = _PICTURE.sub(lambda m: f"[Picture {m.group(1)}] ", text).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_eval(report: EvalReport, console: Console) -> None:
    source = " + ".join(escape(p) for p in (report.model, report.adapter) if p)
    console.print(
        f"[bold]qwenvl eval[/] · {source or 'model'} · {escape(report.data or '')} · "
        f"{report.samples:,} samples · {report.questions:,} questions · {report.elapsed_s:.2f} s"
    )
    table = Table(box=None, padding=(0, 2), show_edge=False)
    table.add_column("metric")
    table.add_column("questions", justify="right")
    table.add_column("score", justify="right")
    table.add_row(
        "exact match", f"{report.exact_n:,}", _share(report.exact_correct, report.exact_n, report.exact_match)
    )
    table.add_row(
        "grounding Acc@0.5",
        f"{report.grounding_n:,}",
        _share(report.grounding_correct, report.grounding_n, report.acc_at_50),
    )
    if report.mean_iou is not None:
        table.add_row("grounding mean IoU", f"{report.grounding_n:,}", f"{report.mean_iou:.3f}")
    table.add_row(
        "all", f"{report.questions:,}", _share(report.correct, report.questions, report.accuracy), style="bold"
    )
    console.print(table)
    if not report.worst:
        return
    worst = Table(title="Worst answers", title_justify="left", expand=False)
    worst.add_column("sample")
    worst.add_column("question", overflow="fold", max_width=40)
    worst.add_column("reference", overflow="fold", max_width=40)
    worst.add_column("prediction", overflow="fold", max_width=40)
    worst.add_column("IoU", justify="right")
    for r in report.worst:
        worst.add_row(
            f"{escape(r.sample_id)}:{r.turn}",
            escape(_short(r.question)),
            escape(r.reference),
            escape(_short(r.prediction)) or "[dim](empty)[/]",
            "" if r.iou is None else f"{r.iou:.2f}",
        )
    console.print(worst)
