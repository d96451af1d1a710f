"""`qwenvl profile`: the grid runs real optimizer steps on CPU, writes JSON/Markdown/PNG, keeps going past a
failed cell, and refuses bad flags with exit code 2."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenvl_cli import profile as profile_service
from qwenvl_cli.cli import app
from qwenvl_cli.profile import ProfileResult, mfu, parse_size_gib

runner = CliRunner()
# one torch thread: on a CPU shared with other jobs, more threads than free cores slow a step many times over
FAST = ("--preset", "tiny", "--steps", "2", "--warmup", "1", "--grad-accum", "1", "--threads", "1")


def invoke(*args: str):
    return runner.invoke(app, ["profile", *args], env={"COLUMNS": "160", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One real grid on CPU: lora-chat at 320 and 384 tokens, each against --recipe upstream (4 processes), each
    with one step more traced by torch.profiler (--trace)."""
    folder = tmp_path_factory.mktemp("profile")
    result = invoke(
        *FAST,
        "--trace",
        str(folder / "traces"),
        "--methods",
        "lora-chat",
        "--lengths",
        "384,320",
        "--baseline",
        "upstream",
        "--gpu-memory",
        "24GB",
        "--output",
        str(folder / "profile.json"),
        "--markdown",
        str(folder / "profile.md"),
        "--plot",
        str(folder / "profile.png"),
    )
    return folder, result


def test_grid_runs_on_cpu_and_writes_json(grid):
    folder, result = grid
    assert result.exit_code == 0, result.output
    profile = ProfileResult.model_validate_json((folder / "profile.json").read_text("utf-8"))
    assert profile.device == "cpu" and profile.lengths == [320, 384]
    assert any("fp32" in note for note in profile.notes)
    assert (profile.picture.tokens, profile.picture.resized) == (258, None)  # v1: 256 queries + 2 markers, any size
    assert profile.picture.text_tokens == {320: 320 - 258, 384: 384 - 258}
    cells = [(c.method, c.length, c.status) for c in profile.cells]
    assert cells == [("lora-chat", 320, "ok"), ("lora-chat", 384, "ok")]
    for cell in profile.cells + profile.baseline_cells:
        assert cell.status == "ok", cell.reason
        assert cell.seconds_per_step > 0 and cell.tokens_per_second > 0 and cell.memory_gib > 0
        assert len(cell.step_seconds) == 2  # the steps after the warmup (the traced step is not among them)
        assert cell.tokens_per_second == pytest.approx(cell.length / cell.seconds_per_step, rel=0.01)
        assert cell.mfu is None  # no GPU, no peak FLOP/s
        assert cell.precision == "fp32"
    assert "lora-chat" in result.stdout and "s/it" in result.stdout


def test_baseline_upstream_gives_ratios(grid):
    folder, result = grid
    profile = json.loads((folder / "profile.json").read_text("utf-8"))
    assert {c["recipe"] for c in profile["baseline_cells"]} == {"upstream"}
    assert len(profile["ratios"]) == 2
    for ratio in profile["ratios"]:
        assert ratio["seconds_per_step_vs_upstream"] > 0 and ratio["memory_vs_upstream"] > 0
    assert "against --recipe upstream" in result.stdout


def test_trace_records_one_more_step_per_cell(grid):
    """--trace: each cell's extra step is written as a gzipped Chrome trace and summarised; v1's picture
    insertion finds its <img> positions with nonzero, a host sync on a GPU, and the summary finds it."""
    import gzip

    folder, result = grid
    profile = ProfileResult.model_validate_json((folder / "profile.json").read_text("utf-8"))
    names = []
    for cell in profile.cells + profile.baseline_cells:
        trace = cell.trace
        assert trace is not None, cell
        path = Path(trace.file)
        names.append(path.name)
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            events = json.load(handle)["traceEvents"]
        assert any(event.get("name") == "aten::mm" for event in events)
        assert trace.seconds > 0 and trace.operator_calls > 1000 and trace.host_ms > 0
        assert trace.host_syncs.get("aten::nonzero", 0) >= 1  # one micro-batch per step (--grad-accum 1)
        assert trace.top_host and trace.top_host[0].self_ms >= trace.top_host[-1].self_ms
        assert trace.kernel_launches is None and trace.device_busy is None  # no GPU here
        # the census of the warmup step names the calling lines: the <img> search in the picture insertion
        sites = {(site.operator, site.where.split(" ← ")[0]) for site in trace.sync_sites}
        assert any(op == "aten::nonzero" and where.endswith(" _insert_images") for op, where in sites), sites
        assert all(where.startswith(("qwenvl_cli/", "transformers/", "peft/", "accelerate/")) for _, where in sites)
        # transformers' NaN/inf log filter, which read every micro-batch's loss on the host, is off
        assert not any(where.endswith(" _run_epoch") for _, where in sites), sites
    assert sorted(names) == sorted(
        ["lora-chat-320.json.gz", "lora-chat-384.json.gz", "lora-chat-320-upstream.json.gz",
         "lora-chat-384-upstream.json.gz"]
    )  # fmt: skip
    assert "trace lora-chat 320:" in result.stdout and "nonzero" in result.stdout
    shown = " ".join(result.stdout.split())  # the terminal wraps long lines
    assert "host sync lora-chat 320:" in shown and "← qwenvl_cli/model/modeling.py:" in shown
    assert "- trace lora-chat 384 (upstream):" in (folder / "profile.md").read_text("utf-8")


def test_sync_census_counts_by_calling_line_and_device():
    import torch

    from qwenvl_cli.step_trace import SyncCensus

    def step(values):
        values = values.clone()
        return values.nonzero(), values.sum().item(), values.nonzero(), values.tolist()

    original = torch.Tensor.tolist

    everywhere, cuda_only = SyncCensus(cuda_only=False), SyncCensus(cuda_only=True)
    for census in (everywhere, cuda_only):
        census.start()
        try:
            step(torch.tensor([0.0, 1.0, 2.0]))
            step(torch.tensor([3.0, 0.0]))
        finally:
            census.stop()
    calls = {site.operator: site.calls for site in everywhere.sites()}
    assert calls == {"aten::nonzero": 4, "aten::_local_scalar_dense": 2, "Tensor.tolist": 2}
    assert cuda_only.sites() == []  # CPU tensors make no host wait
    torch.tensor([1.0]).nonzero().tolist()  # stopped: not counted
    assert sum(site.calls for site in everywhere.sites()) == 8
    assert torch.Tensor.tolist is original  # the wrapper is gone


def test_trace_summary_of_a_gpu_step():
    """What a GPU step's key averages give: kernel time against the step's seconds, launches, the time the host
    spent waiting in the CUDA runtime, and the busiest kernels first."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from qwenvl_cli.step_trace import summarize

    def event(key, device, count, cpu_us=0.0, device_us=0.0, total_cpu_us=None):
        return SimpleNamespace(
            key=key, device_type=device, count=count, self_cpu_time_total=cpu_us, self_device_time_total=device_us,
            cpu_time_total=cpu_us if total_cpu_us is None else total_cpu_us, is_user_annotation=False,
        )  # fmt: skip

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    averages = [
        event("aten::mm", cpu, 400, cpu_us=20_000, device_us=600_000),
        event("aten::_local_scalar_dense", cpu, 5, cpu_us=100),
        event("aten::nonzero", cpu, 8, cpu_us=300),
        event("cudaLaunchKernel", cpu, 1500, cpu_us=9_000),
        event("cudaStreamSynchronize", cpu, 13, cpu_us=250_000),
        event("ProfilerStep*", cpu, 1, cpu_us=1_000),
        event("sm90_xmma_gemm_bf16", cuda, 400, device_us=600_000),
        event("vectorized_elementwise_kernel", cuda, 1100, device_us=200_000),
    ]
    trace = summarize(averages, seconds=2.0, file=Path("t.json.gz"))
    assert trace.operator_calls == 413
    assert trace.host_syncs == {"aten::nonzero": 8, "aten::_local_scalar_dense": 5}
    assert trace.kernel_launches == 1500
    assert trace.host_wait_ms == pytest.approx(250.0)
    assert trace.device_ms == pytest.approx(800.0) and trace.device_busy == pytest.approx(0.4)
    assert [op.name for op in trace.top_kernels] == ["sm90_xmma_gemm_bf16", "vectorized_elementwise_kernel"]
    assert trace.top_host[0].name == "cudaStreamSynchronize"
    line = trace.line()
    assert "GPU busy 40%" in line and "8 × nonzero" in line and "sm90_xmma_gemm_bf16 600 ms" in line


def test_gpu_memory_marks_fits(grid):
    folder, result = grid
    profile = ProfileResult.model_validate_json((folder / "profile.json").read_text("utf-8"))
    assert profile.gpu_memory_gib == 24
    assert all(cell.fits is True for cell in profile.cells)  # a tiny model's process stays far below 24 GiB
    assert "✓" in result.stdout


def test_markdown_and_png_are_written(grid):
    folder, _ = grid
    markdown = (folder / "profile.md").read_text("utf-8")
    assert "| method | 320 | 384 |" in markdown
    assert "| lora-chat | " in markdown and "s/it" in markdown
    with Image.open(folder / "profile.png") as image:
        assert image.format == "PNG" and image.size[0] > 400


def test_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    calls = []

    def fake_worker(spec):
        calls.append((spec["method"], spec["length"]))
        if spec["method"] == "full" and spec["length"] == 100:
            return -9, "", ""  # killed from outside, no last words
        if spec["method"] == "full":
            return 1, "", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        if spec["length"] == 100:
            return 1, '{"status": "failed", "reason": "a sample of 100 tokens cannot hold one picture"}\n', ""
        stamps = [0.0, 1.0, 1.5, 2.0]
        record = {
            "status": "ok",
            "stamps": stamps,
            "losses": [5.0, 4.9, 4.8],
            "parameters": 1000,
            "trainable_parameters": 10,
            "precision": "fp32",
            "peak_rss_gib": 0.5,
            "device_name": "cpu",
        }
        return 0, "log line\n" + json.dumps(record) + "\n", ""

    monkeypatch.setattr(profile_service, "run_worker", fake_worker)
    result = invoke(*FAST, "--methods", "lora-chat,full", "--lengths", "100,320", "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    assert calls == [("lora", 100), ("lora", 320), ("full", 100), ("full", 320)]
    profile = ProfileResult.model_validate_json((tmp_path / "p.json").read_text("utf-8"))
    by_cell = {(c.method, c.length): c for c in profile.cells}
    assert by_cell["lora-chat", 100].status == "failed"
    assert "cannot hold one picture" in by_cell["lora-chat", 100].reason
    assert by_cell["lora-chat", 320].status == "ok"
    assert by_cell["lora-chat", 320].seconds_per_step == pytest.approx(0.5)  # steps after the 1 warmup step
    assert by_cell["full", 320].status == "oom"
    assert by_cell["full", 100].status == "failed" and "signal 9" in by_cell["full", 100].reason
    assert "OOM" in result.stdout and "failed" in result.stdout


def test_gpu_record_gives_reserved_memory_mfu_and_fits(tmp_path, monkeypatch):
    record = {
        "status": "ok",
        "stamps": [0.0, 3.0, 5.0, 7.0],
        "losses": [2.0, 1.9, 1.8],
        "parameters": 9_600_000_000,
        "trainable_parameters": 1000,
        "precision": "bf16",
        "peak_rss_gib": 3.0,
        "peak_allocated_gib": 20.0,
        "peak_reserved_gib": 23.5,
        "device_name": "NVIDIA H100 80GB HBM3",
    }
    monkeypatch.setattr(profile_service, "run_worker", lambda spec: (0, json.dumps(record), ""))
    flags = ("--methods", "lora-chat", "--lengths", "2048", "--gpu-memory", "24GB")
    result = invoke(*FAST, *flags, "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    cell = ProfileResult.model_validate_json((tmp_path / "p.json").read_text("utf-8")).cells[0]
    assert cell.seconds_per_step == pytest.approx(2.0) and cell.memory_gib == pytest.approx(23.5)
    assert cell.fits is True and cell.peak_allocated_gib == pytest.approx(20.0)
    assert cell.mfu == pytest.approx(6 * 9.6e9 * 1024 / 989e12, rel=1e-3)
    assert "23.5G / 2.00s/it" in result.stdout


def test_real_cell_too_short_for_a_picture_fails_with_its_reason(tmp_path):
    result = invoke(*FAST, "--methods", "lora-chat", "--lengths", "100", "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    cell = ProfileResult.model_validate_json((tmp_path / "p.json").read_text("utf-8")).cells[0]
    assert cell.status == "failed" and "cannot hold one picture" in cell.reason


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--lengths", "384,abc"), "comma-separated"),
        (("--lengths", "8"), "at least 16"),
        (("--methods", "lora-chat,dora"), "unknown method 'dora'"),
        (("--baseline", "deepspeed"), "--baseline upstream"),
        (("--gpu-memory", "lots"), "not a size"),
    ],
)
def test_refusals_exit_2(args, words, tmp_path):
    result = invoke(*args, "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 2
    assert words in result.output
    assert not (tmp_path / "p.json").exists()


def test_trace_into_a_file_is_refused(tmp_path):
    taken = tmp_path / "traces"
    taken.write_text("not a folder", "utf-8")
    result = invoke(*FAST, "--methods", "lora-chat", "--lengths", "384", "--trace", str(taken))
    assert result.exit_code == 2
    assert "is a file, not a folder" in result.output and "Traceback" not in result.output
    assert taken.read_text("utf-8") == "not a folder"


def test_qwen_vl_7b_without_a_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_service, "_gpu", lambda: False)
    result = invoke("--preset", "qwen-vl-7b", "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 2
    assert "needs a GPU" in result.output


def test_qwen_vl_7b_on_a_gpu_builds_the_official_sizes_in_each_cell(tmp_path, monkeypatch):
    """No weight file is written: each cell gets a folder with config, vocabulary and generation config, and
    builds random weights of those sizes on the device (random_weights in the worker's spec)."""
    import torch

    monkeypatch.setattr(profile_service, "_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    seen = []

    def fake_worker(spec):
        folder = Path(spec["model"])
        config = json.loads((folder / "config.json").read_text())
        generation = json.loads((folder / "generation_config.json").read_text())
        seen.append((spec, config, generation, sorted(path.name for path in folder.iterdir())))
        if len(seen) > 1:  # the JSON is rewritten after every cell: a grid cut short keeps what it measured
            partial = json.loads((tmp_path / "p.json").read_text())
            assert len(partial["cells"]) == len(seen) - 1
        return 1, json.dumps({"status": "oom", "reason": "CUDA out of memory"}), ""

    monkeypatch.setattr(profile_service, "run_worker", fake_worker)
    result = invoke(
        "--preset", "qwen-vl-7b", "--methods", "lora-chat,lora-base,qlora", "--lengths", "2048",
        "--output", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [spec["method"] for spec, *_ in seen] == ["lora", "lora", "qlora"]
    for spec, config, _generation, files in seen:
        assert files == ["config.json", "generation_config.json", "qwen.tiktoken"]
        assert spec["random_weights"] is True and spec["gradient_checkpointing"] is True
        assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (4096, 32, 22016)
        assert config["vocab_size"] == 151936 and config["visual"]["image_size"] == 448
    assert [generation.get("chat_format") for _, _, generation, _ in seen] == ["chatml", "raw", "chatml"]
    assert seen[2][0]["quant"] == "nf4"
    cells = json.loads((tmp_path / "p.json").read_text())["cells"]
    assert [cell["status"] for cell in cells] == ["oom", "oom", "oom"]


def test_vocab_goes_with_the_7b_preset(tmp_path):
    vocab = tmp_path / "qwen.tiktoken"
    vocab.write_text("")
    result = invoke("--vocab", str(vocab), "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 2
    assert "--vocab goes with --preset qwen-vl-7b" in result.output


def test_gpu_helpers():
    assert parse_size_gib("24GB") == 24 and parse_size_gib("80g") == 80 and parse_size_gib("512MiB") == 0.5
    assert mfu(7_000_000_000, 1000, "NVIDIA H100 80GB HBM3") == pytest.approx(6 * 7e12 / 989e12)
    assert mfu(7_000_000_000, 1000, "NVIDIA A100-SXM4-80GB") == pytest.approx(6 * 7e12 / 312e12)
    assert mfu(7_000_000_000, 1000, "Tesla T4") is None


def test_help_has_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "qwenvl profile --methods lora-chat,full" in result.stdout


def test_random_weights_cells_train_without_a_weight_file(tmp_path):
    """The path --preset qwen-vl-7b takes on a GPU, here with the tiny sizes: a folder without weights, random
    weights built in the cell (NF4 for qlora), real optimizer steps."""
    from qwenvl_cli.model.presets import init_model
    from qwenvl_cli.profile_worker import run_cell

    init_model("tiny", tmp_path / "tiny", weights=False)
    assert not list((tmp_path / "tiny").glob("*.safetensors"))
    for method, quant in (("lora", None), ("qlora", "nf4")):
        spec = {
            "model": str(tmp_path / "tiny"), "method": method, "quant": quant, "length": 384, "batch_size": 1,
            "grad_accum": 2, "steps": 1, "warmup": 1, "gradient_checkpointing": True, "random_weights": True,
        }  # fmt: skip
        record = run_cell(spec)
        assert record["status"] == "ok", record
        assert record["global_step"] == 2 and len(record["stamps"]) == 3
        assert all(0 < loss < 20 for loss in record["losses"])
        assert record["trainable_parameters"] > 0


def test_random_nf4_model_keeps_frozen_weights_16_bit_under_qlora():
    """Q-LoRA: adapters in fp32, every frozen non-quantised weight (ViT, wte, lm_head) left in fp16 — peft's
    prepare_model_for_kbit_training would upcast them all to fp32."""
    import torch

    from qwenvl_cli.families import family_named
    from qwenvl_cli.model.presets import build_random, init_model
    from qwenvl_cli.train.method import apply_method
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.presets import resolve_rules

    with tempfile.TemporaryDirectory() as scratch:
        init_model("tiny", Path(scratch) / "tiny", weights=False)
        default = torch.get_default_dtype()
        model, _ = build_random(Path(scratch) / "tiny", torch.float16, "cpu", quant="nf4")
    assert torch.get_default_dtype() == default
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 5 * model.config.num_hidden_layers
    rules = resolve_rules("qlora", gpu=True)
    model = apply_method(model, TrainOptions(method="qlora"), rules, family_named("qwen-vl"))
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for name, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert trainable and all("lora_" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}
    assert frozen == {torch.float16}


def test_flat_step_times_on_a_gpu_are_called_host_bound():
    """The H100 7B grid (s/it flat from 384 to 2,048 tokens) gets a note per method pointing to --compile; the
    CPU tiny grid, whose steps grow with the length, gets none."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    h100 = ProfileResult.model_validate_json((results / "profile-h100-7b.json").read_text("utf-8"))
    notes = profile_service.host_bound_notes(h100.cells)
    assert [note.split(":")[0] for note in notes] == ["lora-chat", "lora-base", "qlora"]
    assert "×5.3 the tokens (384 → 2048) took ×0.84 the time" in notes[0] and "--compile" in notes[0]
    cpu = ProfileResult.model_validate_json((results / "profile-cpu-tiny.json").read_text("utf-8"))
    assert profile_service.host_bound_notes(cpu.cells) == []
    assert profile_service.host_bound_notes(h100.cells[:1]) == []  # one length: nothing to compare


# -- Qwen2-VL, Qwen2.5-VL, Qwen3-VL --------------------------------------------------------------------------------


def test_family_grid_runs_on_cpu_and_states_the_picture_tokens(vl_models, tmp_path):
    """A tiny Qwen2.5-VL: LoRA and full fine-tuning train for real; lora-base is skipped (no base model); the
    picture line gives the 224-px picture's size after smart_resize and its tokens, per length."""
    from qwenvl_cli.families.hf_vl import image_processor, pixel_budget
    from qwenvl_cli.grounding import smart_resize

    folder = vl_models / "qwen2.5-vl"
    result = invoke(
        "--model", str(folder), "--methods", "lora-chat,lora-base,full", "--lengths", "256",
        "--steps", "1", "--warmup", "1", "--grad-accum", "1", "--threads", "1",
        "--output", str(tmp_path / "p.json"), "--markdown", str(tmp_path / "p.md"), "--plot", str(tmp_path / "p.png"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    profile = ProfileResult.model_validate_json((tmp_path / "p.json").read_text("utf-8"))
    status = {cell.method: (cell.status, cell.reason) for cell in profile.cells}
    assert status["lora-chat"][0] == "ok", status["lora-chat"][1]
    assert status["full"][0] == "ok", status["full"][1]
    assert status["lora-base"][0] == "skipped" and "chat model" in status["lora-base"][1]
    assert profile.cell("lora-chat", 256).trainable_parameters < profile.cell("full", 256).trainable_parameters
    patch, merge, low, high = pixel_budget(image_processor(folder))
    height, width = smart_resize(224, 224, patch * merge, low, high)
    tokens = height * width // (patch * merge) ** 2 + 2  # <|image_pad|> × n between the two markers
    picture = profile.picture
    assert (picture.width, picture.resized, picture.tokens) == (224, (height, width), tokens)
    assert (height, tokens) == (112, 18)  # the tiny processor's 16-token ceiling shrinks the picture
    assert picture.text_tokens == {256: 256 - 18}
    line = "one 224×224 → 112×112 after smart_resize (min 3,136 / max 12,544 px) picture = 18 tokens"
    assert line in " ".join(result.stdout.split())
    assert line in (tmp_path / "p.md").read_text("utf-8")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_family_qlora_cell_trains_4bit_in_a_worker(vl_models, tmp_path):
    """A family's qlora cell (a real worker process) loads the language model in NF4 and takes real steps."""
    result = invoke(
        "--model", str(vl_models / "qwen3-vl"), "--methods", "qlora", "--lengths", "256",
        "--output", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cell = ProfileResult.model_validate_json((tmp_path / "p.json").read_text("utf-8")).cells[0]
    assert (cell.method, cell.status) == ("qlora", "ok"), cell.reason
    assert cell.seconds_per_step > 0 and cell.memory_gib > 0


OFFICIAL_SIZES = {  # official config.json numbers; parameters: the official checkpoints' totals
    "qwen2-vl-7b": ("qwen2_vl", 3584, 28, 28, 4, 18944, 152064, 32, 8_291_375_616),
    "qwen2.5-vl-7b": ("qwen2_5_vl", 3584, 28, 28, 4, 18944, 152064, 32, 8_292_166_656),
    "qwen3-vl-8b": ("qwen3_vl", 4096, 36, 32, 8, 12288, 151936, 27, 8_767_123_696),
}


@pytest.fixture(scope="module")
def official_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    for preset in OFFICIAL_SIZES:
        done = runner.invoke(app, ["init-model", "--preset", preset, "--output", str(root / preset)])
        assert done.exit_code == 0, done.output
        assert "a GPU builds the random weights" in done.output
    return root


@pytest.mark.parametrize("preset", list(OFFICIAL_SIZES))
def test_official_size_presets_have_the_official_numbers(official_folders, preset):
    """init-model writes config only; the skeleton on the meta device has the official parameter count."""
    from qwenvl_cli.families import family_for

    folder = official_folders / preset
    assert not list(folder.glob("*.safetensors"))
    family = family_for(folder)
    config = family.config(folder)
    model_type, hidden, layers, heads, kv, intermediate, vocab, depth, parameters = OFFICIAL_SIZES[preset]
    text = config.text_config
    assert config.model_type == model_type and family.generation.model_type == model_type
    got = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert got == (hidden, layers, heads, kv)
    assert (text.intermediate_size, text.vocab_size, config.vision_config.depth) == (intermediate, vocab, depth)
    assert config.tie_word_embeddings is False
    vision = config.vision_config
    if model_type == "qwen2_5_vl":
        assert vision.fullatt_block_indexes == [7, 15, 23, 31] and vision.window_size == 112
        assert (vision.hidden_size, vision.intermediate_size, vision.out_hidden_size) == (1280, 3420, 3584)
    if model_type == "qwen3_vl":
        assert vision.deepstack_visual_indexes == [8, 16, 24] and vision.num_position_embeddings == 2304
        assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.head_dim == 128
    else:
        assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    tokenizer = family.tokenizer(folder)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    model = family.empty_model(config)
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.parametrize(
    ("preset", "resized", "tokens"),
    [("qwen2-vl-7b", (224, 224), 66), ("qwen2.5-vl-7b", (224, 224), 66), ("qwen3-vl-8b", (256, 256), 66)],
)
def test_official_size_picture_tokens(official_folders, tmp_path, preset, resized, tokens):
    """The official pixel budgets: 224 px is 8×8 merged patches of 28 px (Qwen2/2.5-VL); Qwen3-VL's 65,536-pixel
    floor scales it up to 256 px, 8×8 merged patches of 32 px; 64 <|image_pad|> + 2 markers either way."""
    picture = profile_service.picture_statement(official_folders / preset, [384, 2048], tmp_path)
    assert (picture.resized, picture.tokens) == (resized, tokens)
    assert picture.text_tokens == {384: 384 - tokens, 2048: 2048 - tokens}


@pytest.mark.parametrize("preset", list(OFFICIAL_SIZES))
def test_family_7b_presets_without_a_gpu_are_refused(tmp_path, monkeypatch, preset):
    monkeypatch.setattr(profile_service, "_gpu", lambda: False)
    result = invoke("--preset", preset, "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 2
    assert "needs a GPU" in result.output and "--preset tiny-" in result.output
    assert not (tmp_path / "p.json").exists()


def test_family_7b_preset_on_a_gpu_builds_in_each_cell(tmp_path, monkeypatch):
    """Each cell gets a config-only folder of the official sizes and builds random weights on the device."""
    import torch

    monkeypatch.setattr(profile_service, "_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    seen = []

    def fake_worker(spec):
        folder = Path(spec["model"])
        seen.append((spec, json.loads((folder / "config.json").read_text()), sorted(p.name for p in folder.iterdir())))
        return 1, json.dumps({"status": "oom", "reason": "CUDA out of memory"}), ""

    monkeypatch.setattr(profile_service, "run_worker", fake_worker)
    result = invoke(
        "--preset", "qwen2.5-vl-7b", "--methods", "lora-chat,lora-base,qlora", "--lengths", "2048",
        "--output", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [spec["method"] for spec, *_ in seen] == ["lora", "qlora"]  # lora-base: no base model
    for spec, config, files in seen:
        assert spec["random_weights"] is True
        assert config["text_config"]["hidden_size"] == 3584 and config["text_config"]["vocab_size"] == 152064
        assert "config.json" in files and not any(name.endswith(".safetensors") for name in files)
    profile = json.loads((tmp_path / "p.json").read_text())
    assert [cell["status"] for cell in profile["cells"]] == ["oom", "skipped", "oom"]
    assert profile["picture"]["tokens"] == 66
    assert any("qwen2.5-vl-7b: the official sizes" in note for note in profile["notes"])


def test_family_7b_init_model_refuses_weights(tmp_path):
    result = runner.invoke(app, ["init-model", "--preset", "qwen3-vl-8b", "--weights", "--output", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "--weights with --preset qwen3-vl-8b" in " ".join(result.output.split())
    assert not (tmp_path / "m").exists()
