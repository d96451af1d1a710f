"""PNG charts drawn with matplotlib (Agg, no screen), from plain data only: the training loss curve (with
evaluations) and the `qwenvl profile` memory/speed chart.

matplotlib is imported inside the functions, so importing this module (or the CLI) does not load it. Every
figure is a `matplotlib.figure.Figure` drawn on its own Agg canvas, never pyplot's global figure list, and is
cleared once written. `loss_figure` / `profile_figure` return the figure before it is saved (for tests).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
LOSS_SIZE = (9.0, 5.0)  # inches: 900 × 500 pixels at DPI
PROFILE_SIZE = (12.0, 5.6)  # inches: 1200 × 560 pixels at DPI
SMOOTH_FROM = 20  # points: from this many on, a smoothed line is drawn over the faint raw points
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
LOSS_COLOUR, EVAL_COLOUR, ACCURACY_COLOUR, ACC50_COLOUR = "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"

# (length, peak memory in GiB, seconds per optimizer step); None where the cell has no value (OOM, failed)
ProfilePoint = tuple[int, float | None, float | None]


def _figure(size: tuple[float, float], dpi: int) -> Figure:
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # switching pyplot's backend would close a notebook's figures
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _margins(figure: Figure, left: float, right: float, top: float, bottom: float, wspace: float = 0.2) -> None:
    """Place the axes with margins in inches (the title, legend and caption rows have fixed heights)."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(
        left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height, wspace=wspace
    )


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write the figure as PNG at its own size and DPI, then free it."""
    try:
        figure.savefig(path, format="png", dpi=figure.dpi)
    finally:
        figure.clear()
    return Path(path)


def _finite(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _moving_average(values: list[float], window: int) -> list[float]:
    """Centred mean over `window` values (odd), the window shrinking symmetrically at both ends."""
    half = window // 2
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    smoothed = []
    for index in range(len(values)):
        reach = min(half, index, len(values) - 1 - index)
        low, high = index - reach, index + reach + 1
        smoothed.append((sums[high] - sums[low]) / (high - low))
    return smoothed


def _eval_series(evaluations: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in evaluations:
        step, value = _finite(record.get("step")), _finite(record.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def loss_figure(
    points: Sequence[tuple[float, float]],
    title: str = "training loss",
    evaluations: Sequence[Mapping] | None = None,
    *,
    size: tuple[float, float] = LOSS_SIZE,
    dpi: int = DPI,
) -> Figure:
    """The loss chart as a Figure: training loss against optimizer step (log scale when every loss is
    positive), eval loss as markers on the same axis, accuracy / Acc@0.5 (0–1) on a right-hand axis."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    evaluations = list(evaluations or [])
    pairs = [(_finite(step), _finite(loss)) for step, loss in points]
    pairs = sorted((s, v) for s, v in pairs if s is not None and v is not None)
    steps, losses = [s for s, _ in pairs], [v for _, v in pairs]
    eval_steps, eval_losses = _eval_series(evaluations, "eval_loss")
    accuracy_key = "accuracy" if any(_finite(r.get("accuracy")) is not None for r in evaluations) else "exact_match"
    accuracy = _eval_series(evaluations, accuracy_key)
    acc_at_50 = _eval_series(evaluations, "acc_at_50")
    log_scale = bool(losses or eval_losses) and min(losses + eval_losses) > 0

    figure = _figure(size, dpi)
    axes = figure.add_subplot()
    axes.set_title(title, loc="left", parse_math=False)
    axes.set_xlabel("optimizer step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    if log_scale:
        axes.set_yscale("log")
    axes.grid(True, which="major", color="#d0d0d0", linewidth=0.8)
    axes.grid(True, which="minor", axis="y", color="#ececec", linewidth=0.5)
    axes.set_axisbelow(True)

    if not steps and not eval_steps:
        axes.text(0.5, 0.5, "no loss recorded", transform=axes.transAxes, ha="center", va="center", color="grey")
    if steps:
        axes.set_title(f"last loss {losses[-1]:.4g} at step {steps[-1]:g}", loc="right", fontsize=10, color="dimgrey")
        if len(steps) >= SMOOTH_FROM:
            window = max(5, len(steps) // 20) | 1
            axes.plot(steps, losses, color=LOSS_COLOUR, alpha=0.3, linewidth=0.8, label="training loss", gid="raw")
            curve = [math.log(v) for v in losses] if log_scale else losses
            smooth = _moving_average(curve, window)
            smooth = [math.exp(v) for v in smooth] if log_scale else smooth
            axes.plot(
                steps,
                smooth,
                color=LOSS_COLOUR,
                linewidth=2,
                label=f"smoothed ({window}-point mean)",
                gid="smooth",
            )
        else:
            axes.plot(
                steps,
                losses,
                color=LOSS_COLOUR,
                linewidth=1.5,
                marker="o",
                markersize=4,
                label="training loss",
                gid="raw",
            )
    if eval_steps:
        axes.plot(
            eval_steps,
            eval_losses,
            linestyle="none",
            marker="D",
            markersize=7,
            color=EVAL_COLOUR,
            markeredgecolor="black",
            markeredgewidth=0.6,
            label="eval loss",
            gid="eval_loss",
            zorder=3,
        )

    handles, labels = axes.get_legend_handles_labels()
    twin = bool(accuracy[0] or acc_at_50[0])
    if twin:
        right = axes.twinx()
        right.set_ylim(-0.02, 1.02)
        right.yaxis.set_major_formatter(PercentFormatter(1.0))
        right.set_ylabel("accuracy on the eval samples")
        name = "accuracy" if accuracy_key == "accuracy" else "exact match"
        for (xs, ys), label, colour, marker, gid in (
            (accuracy, name, ACCURACY_COLOUR, "o", "accuracy"),
            (acc_at_50, "Acc@0.5", ACC50_COLOUR, "s", "acc_at_50"),
        ):
            if xs:
                right.plot(
                    xs,
                    ys,
                    color=colour,
                    marker=marker,
                    markersize=6,
                    linewidth=1.2,
                    linestyle="--",
                    label=f"{label} (right axis)",
                    gid=gid,
                )
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    columns = min(len(handles), 3) or 1
    rows = -(-len(handles) // columns)
    _margins(figure, left=0.85, right=0.85 if twin else 0.3, top=0.4, bottom=0.65 + 0.25 * rows)
    if handles:  # in its own row below the axes: never over the curve
        figure.legend(
            handles,
            labels,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.05 / size[1]),
            ncols=columns,
            fontsize=9,
            frameon=False,
        )
    return figure


def loss_curve_png(
    points: Sequence[tuple[float, float]],
    path: str | Path,
    title: str = "training loss",
    evaluations: Sequence[Mapping] | None = None,
) -> Path:
    """Write the loss chart of (step, loss) points, and optionally the evaluations (dicts with `step` and any of
    `eval_loss`, `accuracy`/`exact_match`, `acc_at_50`), as a PNG; returns the path."""
    return save_png(loss_figure(points, title, evaluations), path)


def profile_figure(
    series: Mapping[str, Sequence[ProfilePoint]],
    *,
    title: str,
    caption: str | None = None,
    failures: Mapping[str, Mapping[int, str]] | None = None,
    baselines: Mapping[str, Sequence[ProfilePoint]] | None = None,
    baseline_failures: Mapping[str, Mapping[int, str]] | None = None,
    memory_limit_gib: float | None = None,
    size: tuple[float, float] = PROFILE_SIZE,
    dpi: int = DPI,
) -> Figure:
    """Two panels, peak memory and s/it against tokens per sample, one line per method (`series`), the x ticks
    at the measured lengths. A value of None is marked with an ✕ in the top band of its panel, labelled with
    the reason from `failures` (method → length → "OOM", "failed", …; "failed" when not given). `baselines`
    (method → points of the upstream recipe) are drawn dashed in the method's colour, their reasons in
    `baseline_failures`. `memory_limit_gib` is a dotted line on the memory panel, or a note in its corner when
    it is more than twice every measured value (a line there would flatten the curves)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    failures = failures or {}
    baselines = baselines or {}
    figure = _figure(size, dpi)
    figure.suptitle(title, y=1 - 0.08 / size[1], va="top", parse_math=False)
    panels = figure.subplots(1, 2)
    lengths = sorted({p[0] for points in (*series.values(), *baselines.values()) for p in points})
    colours = {
        method: COLOURS[index % len(COLOURS)] for index, method in enumerate(dict.fromkeys([*series, *baselines]))
    }
    marked_failure = False  # in either panel: the legend explains the ✕
    for index, (axes, panel_title) in enumerate(
        zip(panels, ("peak memory (GiB)", "seconds per optimizer step (s/it)"), strict=True)
    ):
        value_index = index + 1
        axes.set_title(panel_title)
        axes.set_xlabel("tokens per sample")
        axes.set_ylabel("GiB" if index == 0 else "s/it")
        axes.grid(True, color="#d0d0d0", linewidth=0.8)
        axes.set_axisbelow(True)
        if len(lengths) > 1 and lengths[0] > 0:
            axes.set_xscale("log", base=2)
        axes.xaxis.set_major_locator(FixedLocator(lengths))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticklabels([str(n) for n in lengths])
        top, panel_failed = 0.0, False
        groups = [(series, failures, "-", "o", "")]
        if baselines:
            groups.append((baselines, baseline_failures or {}, "--", "^", " (upstream recipe)"))
        for group, reasons, style, marker, suffix in groups:
            for row, (method, points) in enumerate(group.items()):
                measured = sorted((p[0], p[value_index]) for p in points if _finite(p[value_index]) is not None)
                missing = sorted(p[0] for p in points if _finite(p[value_index]) is None)
                axes.plot(
                    [x for x, _ in measured],
                    [y for _, y in measured],
                    linestyle=style,
                    marker=marker,
                    markersize=6,
                    linewidth=2 if not suffix else 1.4,
                    color=colours[method],
                    label=method + suffix,
                    gid=("baseline:" if suffix else "series:") + method,
                )
                top = max([top, *(y for _, y in measured)])
                if missing:
                    marked_failure = panel_failed = True
                    height = 0.95 - 0.07 * (row + (len(series) if suffix else 0))
                    transform = axes.get_xaxis_transform()  # x in data, y in axes fraction: the panel's top band
                    axes.plot(
                        missing,
                        [height] * len(missing),
                        linestyle="none",
                        marker="X",
                        markersize=11,
                        color=colours[method],
                        markeredgecolor="black",
                        transform=transform,
                        gid="failed:" + method,
                        label="_failed",
                    )
                    for length in missing:
                        reason = reasons.get(method, {}).get(length, "failed")
                        last = length == lengths[-1] and len(lengths) > 1  # the label to the marker's left
                        axes.annotate(
                            f"{method}{suffix}: {reason}",
                            (length, height),
                            xycoords=transform,
                            xytext=(-9 if last else 9, -4),
                            ha="right" if last else "left",
                            textcoords="offset points",
                            fontsize=8,
                            color=colours[method],
                            annotation_clip=False,
                        )
        if index == 0 and memory_limit_gib is not None:
            if top == 0 or memory_limit_gib <= 2 * top:
                axes.axhline(memory_limit_gib, color="black", linestyle=":", linewidth=1.2, gid="limit")
                axes.annotate(
                    f"GPU memory {memory_limit_gib:g} GiB",
                    (0.01, memory_limit_gib),
                    xycoords=axes.get_yaxis_transform(),
                    xytext=(0, 3),
                    textcoords="offset points",
                    fontsize=8,
                )
                top = max(top, memory_limit_gib)
            else:
                axes.text(
                    0.01,
                    0.01,
                    f"all below the GPU memory of {memory_limit_gib:g} GiB (off the scale)",
                    transform=axes.transAxes,
                    fontsize=8,
                    color="dimgrey",
                    gid="limit",
                )
        axes.set_ylim(0, (top or 1.0) * (1.35 if panel_failed else 1.12))
    handles, labels = panels[0].get_legend_handles_labels()
    if marked_failure:
        handles.append(
            Line2D([], [], linestyle="none", marker="X", markersize=9, color="grey", markeredgecolor="black")
        )
        labels.append("no value (OOM / failed)")
    columns = min(len(handles), 4 if len(handles) > 6 else 6) or 1
    rows = -(-len(handles) // columns)
    if handles:  # in the header, under the title: never over a curve
        figure.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - 0.38 / size[1]),
            ncols=columns,
            fontsize=9,
            frameon=False,
        )
    lines = textwrap.wrap(caption, 170) if caption else []
    if lines:
        figure.text(
            0.5,
            0.08 / size[1],
            "\n".join(lines),
            ha="center",
            va="bottom",
            fontsize=8,
            color="dimgrey",
            parse_math=False,
        )
    _margins(figure, left=0.75, right=0.3, top=0.8 + 0.22 * rows, bottom=0.75 + 0.15 * len(lines))
    return figure


def profile_chart_png(series: Mapping[str, Sequence[ProfilePoint]], path: str | Path, **options) -> Path:
    """Write `profile_figure(series, **options)` as a PNG; returns the path."""
    return save_png(profile_figure(series, **options), path)
