"""Rich rendering for `qwenvl merge`: a spinner naming the stage, then what was written and --verify's numbers."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..merge import MergeResult


@contextmanager
def merge_stages(console: Console):
    """A stage callback that drives a spinner on a terminal; None elsewhere."""
    if not console.is_terminal:
        yield None
        return
    with console.status("merging", spinner="dots") as status:

        def hook(text: str) -> None:
            status.update(escape(text))

        yield hook


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render_merge(result: MergeResult, console: Console) -> None:
    verdict = result.verification
    if result.written:
        shards = (
            "1 file" if result.shards == 1 else f"{result.shards} shards of at most {_size(result.max_shard_bytes)}"
        )
        console.print(
            f"[green]✓[/] merged {escape(result.adapter)} into {escape(result.output)}: {result.dtype}, "
            f"{result.tensors:,} tensors, {_size(result.total_bytes)} in {shards}, {result.elapsed_s:.1f} s"
        )
    else:
        console.print(f"[red]✗[/] the merged model was not written to {escape(result.output)}: --verify failed")
    table = Table(box=None, padding=(0, 2), show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column()
    checked = {
        "matches": "its fingerprint matches the training run's record",
        "differs": "differs from the training run's base model: accepted with --force",
        "unchecked": "no training run record to check it against",
    }[result.fingerprint]
    table.add_row("base", f"{escape(result.base)}  [dim]({checked})[/]")
    rank = f", r {result.lora_r}" if result.lora_r else ""
    table.add_row("adapter", f"{result.method}{rank}: {result.lora_layers} LoRA layers folded into their weights")
    if result.modules_to_save:
        table.add_row("trained in full", ", ".join(result.modules_to_save) + " (replaced by the run's copies)")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if verdict is not None:
        checks = Table(title="--verify: adapter model vs merged model, fp32 on CPU", title_justify="left")
        checks.add_column("prompt")
        checks.add_column("tokens", justify="right")
        checks.add_column("largest |Δ logit|", justify="right")
        checks.add_column("same top-1 token", justify="right")
        for check in verdict.prompts:
            checks.add_row(check.name, f"{check.tokens:,}", f"{check.max_abs_diff:.2e}", f"{check.top1_agreement:.1%}")
        console.print(checks)
        mark, relation = ("[green]✓[/]", "≤") if verdict.passed else ("[red]✗[/]", ">")
        console.print(
            f"{mark} largest logit difference {verdict.max_abs_diff:.2e} {relation} tolerance "
            f"{verdict.tolerance:.2e} ({escape(verdict.tolerance_rule)})"
        )
        if not verdict.passed:
            console.print(
                "  The adapter was not trained on this base model, or the merge went wrong; nothing was written. "
                "--tolerance sets another bound."
            )
    if result.written and result.consumers:
        loads = Table(title="the merged model loads in", title_justify="left", box=None, padding=(0, 2))
        loads.add_column()
        loads.add_column()
        for program, lack in result.consumers.items():
            loads.add_row(f"{'[green]✓[/]' if lack is None else '[yellow]✗[/]'} {escape(program)}", escape(lack or ""))
        console.print(loads)
        if any(lack is not None for lack in result.consumers.values()):
            console.print(
                "  The missing files come from the base model's folder: merge onto the downloaded official "
                "folder (it ships them) to serve every program."
            )
    if result.written:
        console.print(f"  next: qwenvl eval --model {escape(result.output)} --data eval.json")
