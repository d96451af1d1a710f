"""The PNG charts (qwenvl_cli/charts.py, matplotlib Agg): the loss curve with evaluations and the profile chart,
checked on the Figure before it is saved and on the written PNG."""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys

from PIL import Image

from qwenvl_cli.charts import (
    DPI,
    LOSS_SIZE,
    PROFILE_SIZE,
    loss_curve_png,
    loss_figure,
    profile_chart_png,
    profile_figure,
)
from qwenvl_cli.profile import ProfileCell, ProfileResult
from qwenvl_cli.render.profile import profile_chart_data, profile_png

CURVE = [(step, 7.0 * math.exp(-step / 40) + 0.01) for step in range(1, 301)]
EVALUATIONS = [
    {"step": 0, "eval_loss": 7.1, "accuracy": 0.0, "exact_match": 0.0, "acc_at_50": 0.0, "questions": 40},
    {"step": 100, "eval_loss": 0.4, "accuracy": 0.8, "exact_match": 0.9, "acc_at_50": 0.5, "questions": 40},
    {"step": 200, "eval_loss": 0.2, "accuracy": 0.9, "exact_match": 0.95, "acc_at_50": 0.6, "questions": 40},
]


def line(figure, gid):
    """The one line with this gid in any of the figure's axes."""
    found = [artist for axes in figure.axes for artist in axes.lines if artist.get_gid() == gid]
    assert len(found) == 1, [a.get_gid() for axes in figure.axes for a in axes.lines]
    return found[0]


def gids(axes, prefix):
    return sorted(artist.get_gid() for artist in axes.lines if (artist.get_gid() or "").startswith(prefix))


def test_loss_png_opens_with_the_expected_size(tmp_path):
    written = loss_curve_png(CURVE, str(tmp_path / "loss.png"), title="full · train.json", evaluations=EVALUATIONS)
    assert written == tmp_path / "loss.png"
    with Image.open(written) as image:
        assert image.format == "PNG"
        assert image.size == (round(LOSS_SIZE[0] * DPI), round(LOSS_SIZE[1] * DPI))
        assert len(image.getcolors(maxcolors=1_000_000)) > 50  # drawn on, not a blank canvas


def test_loss_positional_call_of_the_training_run(tmp_path):
    """runner.py calls loss_curve_png(losses, path, title=...) with (step, loss) tuples and no evaluations."""
    written = loss_curve_png([(1, 2.5), (2, 1.5), (3, 1.0)], tmp_path / "loss.png", title="lora · data.json")
    with Image.open(written) as image:
        assert image.size == (900, 500)


def test_log_scale_for_positive_losses_linear_otherwise():
    assert loss_figure(CURVE).axes[0].get_yscale() == "log"
    assert loss_figure([(1, 0.5), (2, 0.0), (3, 0.1)]).axes[0].get_yscale() == "linear"
    assert loss_figure([(1, 0.5), (2, -0.2)]).axes[0].get_yscale() == "linear"
    # an eval loss of 0 is on the same axis: it forces the linear scale too
    assert loss_figure(CURVE, evaluations=[{"step": 10, "eval_loss": 0.0}]).axes[0].get_yscale() == "linear"


def test_eval_markers_one_per_evaluation_with_a_loss():
    figure = loss_figure(CURVE, evaluations=EVALUATIONS)
    markers = line(figure, "eval_loss")
    assert list(markers.get_xdata()) == [0, 100, 200]
    assert list(markers.get_ydata()) == [7.1, 0.4, 0.2]
    assert markers.get_linestyle() == "None" and markers.get_marker() == "D"
    partial = [*EVALUATIONS, {"step": 300, "eval_loss": None, "accuracy": 0.95}]
    assert len(line(loss_figure(CURVE, evaluations=partial), "eval_loss").get_xdata()) == 3


def test_accuracy_axis_only_when_accuracies_are_given():
    assert len(loss_figure(CURVE).axes) == 1
    assert len(loss_figure(CURVE, evaluations=[{"step": 100, "eval_loss": 0.3}]).axes) == 1
    figure = loss_figure(CURVE, evaluations=EVALUATIONS)
    assert len(figure.axes) == 2
    low, high = figure.axes[1].get_ylim()
    assert low <= 0 and 1 <= high < 1.1
    assert list(line(figure, "accuracy").get_ydata()) == [0.0, 0.8, 0.9]
    assert list(line(figure, "acc_at_50").get_ydata()) == [0.0, 0.5, 0.6]
    # exact match stands in when there is no overall accuracy; no Acc@0.5 line without Acc@0.5
    exact = loss_figure(CURVE, evaluations=[{"step": 100, "exact_match": 0.7}])
    assert list(line(exact, "accuracy").get_ydata()) == [0.7]
    assert gids(exact.axes[1], "acc_at_50") == []
    labels = [text.get_text() for text in exact.legends[0].get_texts()]
    assert "exact match (right axis)" in labels


def test_smoothed_line_only_with_many_points_and_legend_below_the_axes():
    figure = loss_figure(CURVE, evaluations=EVALUATIONS)
    raw, smooth = line(figure, "raw"), line(figure, "smooth")
    assert raw.get_alpha() < 0.5 and len(smooth.get_xdata()) == len(CURVE)
    noise = random.Random(0)
    noisy = loss_figure([(step, 1.0 + noise.uniform(-0.5, 0.5)) for step in range(400)])
    raw, smooth = line(noisy, "raw").get_ydata(), line(noisy, "smooth").get_ydata()
    assert statistics.stdev(smooth) < 0.4 * statistics.stdev(raw)  # a 21-point mean: the noise averaged out
    assert abs(statistics.mean(smooth) - 1.0) < 0.05
    assert gids(loss_figure(CURVE[:5]).axes[0], "smooth") == []
    figure.canvas.draw()
    legend = figure.legends[0].get_window_extent()
    assert legend.y1 < figure.axes[0].get_window_extent().y0  # under the plot: it covers no curve


def test_nan_inf_dropped_and_edge_cases():
    figure = loss_figure([(1, 2.0), (2, float("nan")), (3, float("inf")), (4, 1.0)])
    assert list(line(figure, "raw").get_xdata()) == [1, 4]
    assert figure.axes[0].get_yscale() == "log"
    one = loss_figure([(5, 0.7)])
    assert list(line(one, "raw").get_xdata()) == [5] and line(one, "raw").get_marker() == "o"
    empty = loss_figure([(1, float("nan"))])
    assert "no loss recorded" in [text.get_text() for text in empty.axes[0].texts]


def test_titles_are_not_read_as_mathtext(tmp_path):
    """A data file called `a$x_$.json` in the title: matplotlib's mathtext would fail on `$x_$` when drawing."""
    loss_curve_png(CURVE, tmp_path / "loss.png", title="full · a$x_$.json")
    series = {"lora-chat": [(384, 1.0, 0.5)]}
    written = profile_chart_png(series, tmp_path / "profile.png", title="profile: ./my$x_$model", caption="$x_$")
    assert written.is_file()


SERIES = {
    "lora-chat": [(384, 20.2, 3.4), (512, 20.3, 2.7), (1024, 20.6, 2.7), (2048, 21.2, 2.9)],
    "lora-base": [(384, 31.5, 2.6), (512, 31.6, 2.6), (1024, 31.6, 2.2), (2048, None, None)],
    "qlora": [(384, 11.4, 3.0), (512, 11.5, 2.9), (1024, 11.8, 3.2), (2048, 12.4, 3.1)],
}


def test_profile_figure_two_panels_one_line_per_method():
    figure = profile_figure(SERIES, title="qwenvl profile", caption="batch size 1", memory_limit_gib=24)
    assert len(figure.axes) == 2
    for axes in figure.axes:
        assert gids(axes, "series:") == ["series:lora-base", "series:lora-chat", "series:qlora"]
        assert list(axes.get_xticks()) == [384, 512, 1024, 2048]
        assert [label.get_text() for label in axes.get_xticklabels()] == ["384", "512", "1024", "2048"]
    chat = next(a for a in figure.axes[0].lines if a.get_gid() == "series:lora-chat")
    assert list(chat.get_ydata()) == [20.2, 20.3, 20.6, 21.2]
    speed = next(a for a in figure.axes[1].lines if a.get_gid() == "series:qlora")
    assert list(speed.get_ydata()) == [3.0, 2.9, 3.2, 3.1]
    limit = next(a for a in figure.axes[0].lines if a.get_gid() == "limit")
    assert list(limit.get_ydata()) == [24, 24]
    assert "batch size 1" in [text.get_text() for text in figure.texts]


def test_profile_figure_marks_oom_cells():
    figure = profile_figure(SERIES, title="t", failures={"lora-base": {2048: "OOM"}})
    for axes in figure.axes:
        base = next(a for a in axes.lines if a.get_gid() == "series:lora-base")
        assert list(base.get_xdata()) == [384, 512, 1024]  # the line stops before the OOM cell
        assert gids(axes, "failed:") == ["failed:lora-base"]
        (marker,) = [a for a in axes.lines if a.get_gid() == "failed:lora-base"]
        assert list(marker.get_xdata()) == [2048] and marker.get_marker() == "X"
        assert "lora-base: OOM" in [text.get_text() for text in axes.texts]
    assert "no value (OOM / failed)" in [text.get_text() for text in figure.legends[0].get_texts()]
    clean = profile_figure({"qlora": SERIES["qlora"]}, title="t")
    assert all(gids(axes, "failed:") == [] for axes in clean.axes)


def test_profile_memory_limit_far_above_is_a_note_not_a_line():
    figure = profile_figure({"full": [(384, 0.6, 0.2), (512, 0.62, 0.3)]}, title="t", memory_limit_gib=24)
    assert gids(figure.axes[0], "limit") == []
    assert figure.axes[0].get_ylim()[1] < 1
    assert any("24 GiB" in text.get_text() for text in figure.axes[0].texts)


def test_profile_png_from_a_profile_result(tmp_path):
    """render/profile.py adapts ProfileResult: OOM and failed cells by status, upstream cells dashed."""

    def cell(method, length, status="ok", recipe="qwenvl", memory=1.0, speed=0.5):
        ok = status == "ok"
        return ProfileCell(
            method=method,
            length=length,
            recipe=recipe,
            status=status,
            memory_gib=memory if ok else None,
            seconds_per_step=speed if ok else None,
            reason=None if ok else "out of memory",
        )

    result = ProfileResult(
        created="2026-01-01T00:00:00+00:00",
        model="preset tiny",
        device="cpu",
        memory_kind="peak RSS",
        methods=["lora-chat", "full"],
        lengths=[384, 512],
        batch_size=1,
        grad_accum=8,
        steps=3,
        warmup=1,
        gpu_memory_gib=2.0,
        baseline="upstream",
        cells=[cell("lora-chat", 384), cell("lora-chat", 512, "oom"), cell("full", 384), cell("full", 512, "failed")],
        baseline_cells=[cell("lora-chat", 512, recipe="upstream", memory=1.5, speed=0.9)],
    )
    written = profile_png(result, tmp_path / "profile.png")
    with Image.open(written) as image:
        assert image.format == "PNG"
        assert image.size == (round(PROFILE_SIZE[0] * DPI), round(PROFILE_SIZE[1] * DPI))

    series, options = profile_chart_data(result)
    assert series["lora-chat"] == [(384, 1.0, 0.5), (512, None, None)]
    memory = profile_figure(series, **options).axes[0]
    texts = [text.get_text() for text in memory.texts]
    assert "lora-chat: OOM" in texts and "full: failed" in texts
    assert gids(memory, "baseline:") == ["baseline:lora-chat"]
    assert next(a for a in memory.lines if a.get_gid() == "baseline:lora-chat").get_linestyle() == "--"
    assert gids(memory, "limit") == ["limit"]


def test_matplotlib_is_imported_lazily_and_pyplot_never(tmp_path):
    """Importing the CLI loads no matplotlib; drawing loads it, but not pyplot (no global figure state)."""
    code = (
        "import sys, qwenvl_cli.cli, qwenvl_cli.charts as c\n"
        "loaded = lambda name: any(m == name or m.startswith(name + '.') for m in sys.modules)\n"
        "print(loaded('matplotlib'))\n"
        f"c.loss_curve_png([(1, 2.0), (2, 1.0)], {str(tmp_path / 'l.png')!r})\n"
        f"c.profile_chart_png({{'full': [(384, 1.0, 0.5)]}}, {str(tmp_path / 'p.png')!r}, title='t')\n"
        "print(loaded('matplotlib'), loaded('matplotlib.pyplot'), __import__('matplotlib').get_backend())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "False", "Agg"]
