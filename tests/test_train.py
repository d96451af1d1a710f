"""`qwenvl train` on the tiny models (CPU, fp32): methods, rules, run folders, resume, refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.demo import DEMO_DATA
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.model.checkpoint import load_checkpoint
from qwenvl_cli.schemas import RunManifest
from qwenvl_cli.train.presets import resolve_rules
from qwenvl_cli.train.runner import TrainOptions, run_training


@pytest.fixture
def data(tmp_path):
    """The demo data set, copied so that tests can change it."""
    folder = tmp_path / "data"
    shutil.copytree(DEMO_DATA.parent, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return folder / "train.json"


def train_in_processes(models, data, out, *flags: str):
    """`qwenvl train` as a real command (several processes); returns the finished process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "QWENVL_CACHE_DIR": str(out.parent / "cache")}
    common = [
        "--model",
        str(models / "tiny"),
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--grad-accum",
        "1",
        "--lora-r",
        "4",
    ]
    command = [sys.executable, "-m", "qwenvl_cli", "train", *flags, *common]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def options(models, data, output, **changes) -> TrainOptions:
    settings = {
        "model": models / "tiny",
        "data": data,
        "output": output,
        "max_steps": 3,
        "grad_accum": 1,
        "lora_r": 4,
        "save_steps": 2,
        "lr": 1e-3,
    }
    settings.update(changes)
    return TrainOptions(**settings)


def test_lora_run_folder_is_self_contained_and_loads_with_peft(models, data, tmp_path):
    from peft import PeftModel

    events = []
    result = run_training(options(models, data, tmp_path / "run"), lambda kind, payload: events.append(kind))
    out = tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "qwen.tiktoken",
        "generation_config.json",
        "loss.png",
        "qwenvl_run.json",
        "checkpoints",
    } <= names
    manifest = RunManifest.model_validate_json((out / "qwenvl_run.json").read_text())
    assert (manifest.method, manifest.global_step, manifest.samples) == ("lora", 3, 14)
    assert manifest.arguments["lora_r"] == 4 and manifest.packages["torch"]
    assert manifest.base_fingerprint and len(manifest.data_sha256) == 64
    assert result.final_loss is not None and result.tokens_per_second > 0
    assert events[0] == "start" and events[-1] == "done" and "log" in events and "save" in events
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"c_attn", "attn.c_proj", "w1", "w2"}
    assert not adapter.get("modules_to_save")  # a chat model: wte and lm_head stay frozen
    base, tokenizer = load_checkpoint(models / "tiny")
    loaded = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([tokenizer.encode("What colour is the square?")])
    fresh, _ = load_checkpoint(models / "tiny")
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_lora_on_a_base_model_also_trains_wte_and_lm_head(models, data, tmp_path):
    result = run_training(options(models, data, tmp_path / "run", model=models / "tiny-base", max_steps=1))
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert set(adapter["modules_to_save"]) == {"wte", "lm_head"}
    assert any("base model" in note for note in result.notes)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any("wte" in key for key in keys) and any("lm_head" in key for key in keys)


def test_full_training_writes_the_official_layout_and_keeps_the_vit_frozen(models, data, tmp_path):
    run_training(options(models, data, tmp_path / "run", method="full", lr=1e-2, max_steps=2))
    trained, _ = load_checkpoint(tmp_path / "run")
    base, _ = load_checkpoint(models / "tiny")
    before, after = base.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    assert torch.equal(before["transformer.visual.conv1.weight"], after["transformer.visual.conv1.weight"])
    assert torch.equal(
        before["transformer.visual.transformer.resblocks.0.attn.in_proj.weight"],
        after["transformer.visual.transformer.resblocks.0.attn.in_proj.weight"],
    )
    assert not torch.equal(before["transformer.visual.attn_pool.query"], after["transformer.visual.attn_pool.query"])
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    pos = "transformer.visual.attn_pool.pos_embed"
    assert torch.equal(before[pos], after[pos])
    manifest = json.loads((tmp_path / "run" / "qwenvl_run.json").read_text())
    assert manifest["method"] == "full"


@pytest.mark.parametrize("quant", ["nf4", "gptq"])
def test_qlora_trains_adapters_over_a_4bit_model(models, data, tmp_path, quant):
    pytest.importorskip("bitsandbytes" if quant == "nf4" else "gptqmodel")
    model_dir = models / "tiny"
    if quant == "gptq":
        from qwenvl_cli.model.quant import quantize_gptq

        model_dir = tmp_path / "tiny-int4"
        quantize_gptq(models / "tiny", model_dir)
    changes = {"quant": "nf4"} if quant == "nf4" else {}
    result = run_training(
        options(models, data, tmp_path / "run", model=model_dir, method="qlora", max_steps=2, **changes)
    )
    manifest = json.loads((tmp_path / "run" / "qwenvl_run.json").read_text())
    assert (manifest["method"], manifest["quantisation"]) == ("qlora", quant)
    assert result.global_step == 2 and result.final_loss == result.final_loss  # not NaN
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "qlora", "precision": "bf16", "gpu": True}, "fp16 only"),
        ({"method": "qlora", "engine": "deepspeed", "zero": 3, "gpu": True}, "ZeRO-3 is refused"),
        ({"method": "qlora", "engine": "fsdp", "gpu": True}, "FSDP is refused"),
        ({"method": "lora", "train_vit": True}, "--train-vit goes with --method full"),
        ({"method": "qlora", "base_model": True}, "Q-LoRA on a base model is refused"),
        ({"method": "sgd"}, "unknown method"),
    ],
)
def test_rules_refuse_with_the_reason(kwargs, message):
    with pytest.raises(QwenvlError, match=message):
        resolve_rules(**kwargs)


def test_rules_resolve_precision():
    assert resolve_rules("lora", gpu=True).precision == "bf16"
    assert resolve_rules("qlora", gpu=True).precision == "fp16"
    cpu = resolve_rules("full", "bf16", gpu=False)
    assert cpu.precision == "fp32" and "no GPU" in cpu.notes[0]
    assert resolve_rules("lora", base_model=True, base_modules=("wte", "lm_head")).modules_to_save == ("wte", "lm_head")


def test_method_and_checkpoint_mismatches_are_refused(models, data, tmp_path):
    with pytest.raises(QwenvlError, match="--quant goes with --method qlora"):
        run_training(options(models, data, tmp_path / "a", quant="nf4"))


def test_resume_auto_continues_where_an_interrupted_run_stopped(models, data, tmp_path):
    full = run_training(options(models, data, tmp_path / "straight", max_steps=4))

    def interrupt_after_first_save(kind, payload):
        if kind == "save":
            raise KeyboardInterrupt

    with pytest.raises(QwenvlError, match="--resume auto") as stopped:
        run_training(options(models, data, tmp_path / "cut", max_steps=4), interrupt_after_first_save)
    assert stopped.value.exit_code == 130
    assert not (tmp_path / "cut" / "qwenvl_run.json").exists()  # not a finished run
    resumed = run_training(options(models, data, tmp_path / "cut", max_steps=4, resume="auto"))
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 4
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert full.global_step == 4


def test_resume_refuses_when_the_data_changed(models, data, tmp_path):
    def stop(kind, payload):
        if kind == "save":
            raise KeyboardInterrupt

    with pytest.raises(QwenvlError):
        run_training(options(models, data, tmp_path / "run", max_steps=4), stop)
    samples = json.loads(data.read_text())
    data.write_text(json.dumps(samples[:-1]))
    with pytest.raises(QwenvlError, match="data_sha256"):
        run_training(options(models, data, tmp_path / "run", max_steps=4, resume="auto"))


def test_a_finished_run_is_not_overwritten(models, data, tmp_path):
    run_training(options(models, data, tmp_path / "run", max_steps=1))
    with pytest.raises(QwenvlError, match="already holds a finished run"):
        run_training(options(models, data, tmp_path / "run", max_steps=1))


def test_dry_run_writes_nothing(models, data, tmp_path):
    result = run_training(options(models, data, tmp_path / "run", dry_run=True))
    assert result.dry_run and result.trainable_parameters < result.total_parameters
    assert not (tmp_path / "run").exists()


def test_invalid_data_stops_the_run_unless_skipped(models, data, tmp_path):
    samples = json.loads(data.read_text())
    samples[0]["conversations"][0]["from"] = "human"
    data.write_text(json.dumps(samples))
    with pytest.raises(QwenvlError, match="S113"):
        run_training(options(models, data, tmp_path / "run", dry_run=True))
    result = run_training(options(models, data, tmp_path / "run", dry_run=True, skip_invalid=True))
    assert (result.samples, result.skipped_invalid) == (13, 1)


def test_too_long_samples_are_dropped_when_the_cut_would_hit_a_picture(models, data, tmp_path):
    result = run_training(options(models, data, tmp_path / "run", dry_run=True, max_length=200))
    assert result.dropped_samples == 13 and result.samples == 1  # only the text-only sample fits


def test_cli_train_with_a_yaml_config(models, data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {models / 'tiny'}\ndata: {data}\nmax_steps: 2\ngrad_accum: 1\nlora_r: 64\n")
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--output", str(out), "--lora-r", "4"])
    assert result.exit_code == 0, result.output
    assert "training finished" in result.stdout
    manifest = json.loads((out / "qwenvl_run.json").read_text())
    assert manifest["arguments"]["lora_r"] == 4  # the flag wins over the file
    assert manifest["arguments"]["max_steps"] == 2  # the file wins over the default
    config.write_text("learning_rat: 0.1\n")
    bad = runner.invoke(app, ["train", "--config", str(config), "--dry-run"])
    assert bad.exit_code == 2 and "unknown option 'learning_rat'" in bad.stderr


@pytest.mark.slow
def test_two_processes_with_ddp_over_gloo(models, data, tmp_path):
    """`--nproc 2` re-launches through torchrun; rank 0 writes one run folder."""
    out = tmp_path / "ddp"
    done = train_in_processes(models, data, out, "--nproc", "2")
    assert "launching 2 processes" in done.stderr
    assert done.stdout.count("training finished") == 1  # only rank 0 reports
    manifest = json.loads((out / "qwenvl_run.json").read_text())
    assert (manifest["processes"], manifest["global_step"]) == (2, 2)
    assert (out / "adapter_model.safetensors").is_file()


def test_eval_data_is_scored_during_training(models, tmp_path):
    from qwenvl_cli.data.synth import synthesize

    synthesize(tmp_path / "syn", n=24, seed=3)
    events = []
    result = run_training(
        options(
            models,
            tmp_path / "syn" / "train.json",
            tmp_path / "run",
            eval_data=tmp_path / "syn" / "eval.json",
            eval_every=2,
            eval_samples=2,
            max_steps=4,
        ),
        lambda kind, payload: events.append((kind, payload)),
    )
    evals = [payload for kind, payload in events if kind == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]  # step 0: the "before" numbers
    for record in evals:
        assert record["eval_loss"] > 0 and record["questions"] >= 2
        assert 0.0 <= record["accuracy"] <= 1.0
    manifest = json.loads((tmp_path / "run" / "qwenvl_run.json").read_text())
    assert manifest["evaluations"] == result.evaluations == evals


def test_tensorboard_event_files(models, data, tmp_path):
    run_training(options(models, data, tmp_path / "run", max_steps=2, report_to="tensorboard"))
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_deepspeed_zero3_on_two_processes_saves_complete_weights(models, data, tmp_path, method):
    """ZeRO-3 shards parameters across ranks; the run folder must still hold every tensor whole."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    train_in_processes(models, data, out, "--nproc", "2", "--engine", "deepspeed", "--zero", "3", "--method", method)
    assert json.loads((out / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 3
    if method == "lora":
        from safetensors.torch import load_file

        adapter = load_file(str(out / "adapter_model.safetensors"))
        assert len(adapter) == 16  # 2 blocks × 4 targets × (A, B)
        assert adapter["base_model.model.transformer.h.1.mlp.w2.lora_A.weight"].shape == (4, 128)
        assert all(t.numel() > 0 for t in adapter.values())
    else:
        trained, _ = load_checkpoint(out)
        base, _ = load_checkpoint(models / "tiny")
        assert trained.transformer.wte.weight.shape == base.transformer.wte.weight.shape
        assert not torch.equal(trained.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
        assert torch.equal(trained.transformer.visual.conv1.weight, base.transformer.visual.conv1.weight)


def test_cli_lora_targets(models, data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(models / "tiny"),
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "1",
            "--grad-accum",
            "1",
            "--lora-r",
            "2",
            "--lora-targets",
            "c_attn",
        ],
    )
    assert result.exit_code == 0, result.output
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["c_attn"]


# --- packing --------------------------------------------------------------------------------------------


def test_pack_rows_best_fit_decreasing():
    from qwenvl_cli.train.data import pack_rows

    lengths = [900, 300, 700, 100, 1000, 200, 500, 300]
    rows = pack_rows(lengths, 1000)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each sample once
    assert all(sum(lengths[i] for i in row) <= 1000 for row in rows)
    assert len(rows) == 4  # 4000 tokens in rows of 1000: no row wasted
    assert all(row == sorted(row) for row in rows) and pack_rows(lengths, 1000) == rows
    with pytest.raises(ValueError, match="more than a row's 1000"):
        pack_rows([1001], 1000)


def test_packed_rows_number_samples_restart_positions_and_unlabel_each_first_token(models, data):
    from qwenvl_cli.model.datasets import PackedDataset
    from qwenvl_cli.model.processor import PaddingCollator
    from qwenvl_cli.model.template import IGNORE_INDEX, IMAGE_TOKENS, ChatTemplate
    from qwenvl_cli.model.tokenizer import QwenVLTokenizer
    from qwenvl_cli.train.data import pack_rows, prepare_samples

    template = ChatTemplate(QwenVLTokenizer.from_pretrained(models / "tiny"))
    samples = prepare_samples(data, template, 2048, IMAGE_TOKENS, data.parent, False).samples
    dataset = PackedDataset(samples, pack_rows([len(s.input_ids) for s in samples], 2048), 56, data.parent)
    assert len(dataset) < len(samples)
    row = max(range(len(dataset)), key=lambda i: len(dataset.rows[i]))
    item = dataset[row]
    members = [samples[i] for i in dataset.rows[row]]
    starts = [0]
    for member in members:
        starts.append(starts[-1] + len(member.input_ids))
    assert item["input_ids"].tolist() == [t for m in members for t in m.input_ids]
    for number, (member, start) in enumerate(zip(members, starts, strict=False), 1):
        span = slice(start, start + len(member.input_ids))
        assert item["segments"][span].tolist() == [number] * len(member.input_ids)
        assert item["position_ids"][span].tolist() == list(range(len(member.input_ids)))
        assert item["labels"][span].tolist()[1:] == member.labels[1:]
        assert number == 1 or item["labels"][start] == IGNORE_INDEX
    pictures = sum(len(m.image_paths) for m in members)
    assert (item["pixel_values"] is None and pictures == 0) or item["pixel_values"].shape[0] == pictures
    batch = PaddingCollator(template.tokenizer.eod_id)([item, dataset[(row + 1) % len(dataset)]])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["position_ids"].shape == batch["input_ids"].shape
    assert batch["attention_mask"][0, : len(item["input_ids"])].tolist() == item["segments"].tolist()


def test_training_with_packing(models, data, tmp_path):
    events = []
    result = run_training(options(models, data, tmp_path / "run", packing=True, epochs=1.0, max_steps=-1),
                          lambda kind, payload: events.append((kind, payload)))  # fmt: skip
    plain = run_training(options(models, data, tmp_path / "plain", epochs=1.0, max_steps=-1))
    assert result.global_step < plain.global_step  # fewer rows than samples, one row per step
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    note = next(n for n in result.notes if n.startswith("packing:"))
    assert f"{result.samples} samples in" in note
    start = next(payload for kind, payload in events if kind == "start")
    assert note in start["notes"]
    manifest = RunManifest.model_validate_json((tmp_path / "run" / "qwenvl_run.json").read_text())
    assert manifest.arguments["packing"] is True


def test_upstream_recipe_pads_every_sample_to_max_length_and_refuses_packing(models, data, tmp_path):
    upstream = run_training(options(models, data, tmp_path / "up", recipe="upstream", max_length=1024, max_steps=2))
    ours = run_training(options(models, data, tmp_path / "ours", max_length=1024, max_steps=2))
    assert upstream.padding_share > 0.3 and ours.padding_share < upstream.padding_share
    assert upstream.samples_seen == ours.samples_seen == 2
    with pytest.raises(QwenvlError, match="never packs"):
        run_training(options(models, data, tmp_path / "both", recipe="upstream", packing=True))


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_final_loss(models, data, tmp_path):
    """A real `kill -9` of `qwenvl train` after a checkpoint, then --resume auto: the same final loss as an
    uninterrupted run (tolerance 1e-5, CPU, fixed seed), and the same adapter."""
    import os
    import signal
    import subprocess
    import sys
    import time

    flags = ["--model", str(models / "tiny"), "--data", str(data), "--max-steps", "30", "--save-steps", "5"]
    flags += ["--grad-accum", "2", "--lora-r", "4", "--lr", "1e-3", "--seed", "7"]
    env = {**os.environ, "QWENVL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def train(out, *extra):
        command = [sys.executable, "-m", "qwenvl_cli", "train", *flags, "--output", str(out), *extra]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    straight = train(tmp_path / "straight")
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-2000:]

    cut = tmp_path / "cut"
    victim = train(cut)
    deadline = time.monotonic() + 300
    while not (cut / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file():
        assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (cut / "qwenvl_run.json").exists(), "the run finished before it was killed"

    resumed = train(cut, "--resume", "auto")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    first = RunManifest.model_validate_json((tmp_path / "straight" / "qwenvl_run.json").read_text())
    second = RunManifest.model_validate_json((cut / "qwenvl_run.json").read_text())
    assert first.global_step == second.global_step == 30
    assert abs(first.final_loss - second.final_loss) <= 1e-5, (first.final_loss, second.final_loss)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


ENGINES = [["--engine", "ddp"], ["--engine", "deepspeed", "--zero", "2"], ["--engine", "deepspeed", "--zero", "3"]]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES, ids=["ddp", "zero2", "zero3"])
def test_two_processes_train_like_one_process_with_their_batches_together(models, data, tmp_path, engine):
    """2 processes × batch 1 see, step by step, the samples one process sees in batches of 2 (accelerate
    deals the batches of one seeded order out to the ranks), and the gradient of a step is the mean over
    all its supervised tokens either way: the per-step losses and the adapter agree. Tolerance: 1e-4 on
    losses (float sums in another order), 1e-4 relative on the weights. (One process with --engine
    deepspeed also shows that DeepSpeed runs without a launcher.)"""
    if "deepspeed" in engine:
        pytest.importorskip("deepspeed")
    # no LoRA dropout: its random masks are drawn differently by one process and by two; with (reentrant)
    # gradient checkpointing, which DDP and ZeRO must take with their gradient hooks
    flags = ["--lr", "1e-2", "--save-steps", "1", "--seed", "3", "--lora-dropout", "0", "--gradient-checkpointing"]
    one = tmp_path / "one"
    train_in_processes(models, data, one, *flags, "--batch-size", "2", *engine)
    two = tmp_path / "two"
    train_in_processes(models, data, two, *flags, "--batch-size", "1", "--nproc", "2", *engine)

    def losses(run):
        state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    assert len(losses(one)) == len(losses(two)) == 2
    for a, b in zip(losses(one), losses(two), strict=True):
        assert abs(a - b) <= 1e-4, (losses(one), losses(two))
    from safetensors.torch import load_file

    first = load_file(str(one / "adapter_model.safetensors"))
    second = load_file(str(two / "adapter_model.safetensors"))
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_deepspeed_in_one_process_needs_no_launcher_and_leaves_the_environment_as_it_was(models, data, tmp_path):
    pytest.importorskip("deepspeed")
    import os

    before = dict(os.environ)
    result = run_training(options(models, data, tmp_path / "ds", engine="deepspeed", zero=2, max_steps=2))
    assert result.global_step == 2 and (tmp_path / "ds" / "deepspeed_config.json").is_file()
    assert dict(os.environ) == before  # RANK, WORLD_SIZE, … and TrainingArguments' ACCELERATE_USE_DEEPSPEED
    # A plain run afterwards in the same process trains without DeepSpeed (accelerate's state was reset too).
    plain = run_training(options(models, data, tmp_path / "plain", max_steps=1))
    assert (
        plain.global_step == 1 and plain.engine == "DDP" and not (tmp_path / "plain" / "deepspeed_config.json").exists()
    )


def test_compile_gives_the_same_training_and_compiles_every_block_without_graph_breaks(tmp_path, models):
    """--compile (torch.compile of each LM and ViT block, with LoRA adapters and gradient checkpointing in
    them): the same losses as eager, one compiled graph per kind of block and grad mode, no graph break."""
    from torch._dynamo.utils import counters

    from qwenvl_cli.train.lengths_data import make_data

    make_data(tmp_path / "data", models / "tiny", [320] * 4, seed=0)
    runs = {}
    for compiled in (False, True):
        counters.clear()
        options = TrainOptions(
            method="lora", model=models / "tiny", data=tmp_path / "data" / "data.json",
            output=tmp_path / f"run-{compiled}", max_length=320, batch_size=1, grad_accum=2, max_steps=2,
            lora_dropout=0.0, gradient_checkpointing=True, save_steps=1000, compile=compiled, seed=0,
        )  # fmt: skip
        runs[compiled] = run_training(options)
        graphs = counters["stats"]["unique_graphs"]
        # QwenBlock twice (reentrant checkpointing runs it without gradients, then again with them in the
        # backward pass) and VisionBlock once
        assert (graphs == 3) if compiled else (graphs == 0)
        assert sum(counters["graph_break"].values()) == 0
    assert runs[True].final_loss == pytest.approx(runs[False].final_loss, abs=1e-4)


def test_base_model_lora_parks_the_frozen_originals_and_training_never_calls_them(models, data, tmp_path, monkeypatch):
    """A base-model LoRA trains copies of wte and lm_head (peft's modules_to_save); on one GPU the frozen
    originals wait in CPU memory. Here the parking is forced on the CPU and every original raises if called:
    training, checkpointing and evaluation finish without touching them."""
    from qwenvl_cli.train import placement

    parked = []

    def park_and_guard(model, device):
        from peft.utils import ModulesToSaveWrapper

        def refuse(module, args):
            raise AssertionError("a parked original was called")

        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                parked.append(module.original_module.register_forward_pre_hook(refuse))
        return park(model, device)

    def park_and_guard_elsewhere(model, device):  # "meta": a device that nothing can compute on or copy from
        return park_and_guard(model, "meta")

    park = placement.park_frozen_originals
    monkeypatch.setattr(placement, "one_cuda_process", lambda options: True)
    monkeypatch.setattr(placement, "park_frozen_originals", park_and_guard_elsewhere)
    result = run_training(
        options(models, data, tmp_path / "run", model=models / "tiny-base", max_steps=2, save_steps=1,
                eval_data=data, eval_every=2, eval_samples=2)
    )  # fmt: skip
    assert len(parked) == 2  # wte and lm_head
    assert result.global_step == 2 and result.evaluations
    assert any("wait in CPU memory" in note for note in result.notes)


def test_lora_on_a_chat_model_looks_embeddings_up_in_host_memory_with_the_same_training(
    models, data, tmp_path, monkeypatch
):
    """On one GPU the frozen wte of LoRA and Q-LoRA waits in CPU memory; each forward pass looks its rows up
    there and sends them on (here forced on the CPU, where both moves stay on the CPU). Training, checkpoints
    and evaluation by generation go through the hooks, and the losses equal a run without them."""
    from qwenvl_cli.train import placement

    installed = []

    def install_and_count(model, device="cpu"):
        calls = installed.append
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: calls(out.device))
        return embeddings(model, device)

    embeddings = placement.embeddings_in_host_memory
    settings = {"max_steps": 2, "save_steps": 1, "eval_data": data, "eval_every": 2, "eval_samples": 2}
    plain = run_training(options(models, data, tmp_path / "plain", **settings))
    monkeypatch.setattr(placement, "one_cuda_process", lambda options: True)
    monkeypatch.setattr(placement, "embeddings_in_host_memory", install_and_count)
    hosted = run_training(options(models, data, tmp_path / "hosted", **settings))
    assert any("looked up in CPU memory" in note for note in hosted.notes)
    assert not any("looked up in CPU memory" in note for note in plain.notes)
    assert len(installed) > 2  # training steps and the evaluation's generation
    assert hosted.global_step == plain.global_step == 2 and hosted.evaluations
    assert hosted.final_loss == pytest.approx(plain.final_loss, abs=1e-6)
    assert hosted.evaluations[-1]["eval_loss"] == pytest.approx(plain.evaluations[-1]["eval_loss"], abs=1e-6)


def test_embeddings_in_host_memory_moves_only_frozen_tables_and_keeps_inputs_requiring_grad(models):
    from qwenvl_cli.train.placement import embeddings_in_host_memory

    model, _ = load_checkpoint(models / "tiny")
    ids = torch.tensor([[5, 6, 7]])
    assert embeddings_in_host_memory(model, "meta") == 0  # trainable (full fine-tuning): left alone
    assert model.transformer.wte.weight.device.type == "cpu"
    model.requires_grad_(False)
    model.enable_input_require_grads()  # as gradient checkpointing with frozen embeddings does
    expected = model.get_input_embeddings()(ids)
    assert embeddings_in_host_memory(model, "cpu") == model.transformer.wte.weight.numel()
    rows = model.get_input_embeddings()(ids)
    assert torch.equal(rows, expected) and rows.requires_grad
    other, _ = load_checkpoint(models / "tiny")
    other.requires_grad_(False)
    embeddings_in_host_memory(other, "meta")
    assert other.transformer.wte.weight.device.type == "meta" and other.compute_device.type == "cpu"


def test_park_frozen_originals_counts_what_it_moves(models):
    from peft import LoraConfig, get_peft_model

    from qwenvl_cli.train.placement import park_frozen_originals

    model, _ = load_checkpoint(models / "tiny-base")
    size = model.transformer.wte.weight.numel() + model.lm_head.weight.numel()
    model = get_peft_model(model, LoraConfig(target_modules=["c_attn"], modules_to_save=["wte", "lm_head"]))
    assert park_frozen_originals(model, "cpu") == size


CHUNKED_RUN = """
import json, sys
from pathlib import Path
import qwenvl_cli.model.modeling as modeling
from qwenvl_cli.train.runner import TrainOptions, run_training
models, data, out, rows_per_chunk = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
vocab = json.loads((models / "tiny" / "config.json").read_text())["vocab_size"]
modeling.LOSS_CHUNK_ELEMENTS = rows_per_chunk * vocab
rows = []
scored = modeling._summed_cross_entropy
modeling._summed_cross_entropy = lambda head, hidden, targets: rows.append(len(hidden)) or scored(head, hidden, targets)
options = TrainOptions(model=models / "tiny", data=data, output=out, max_steps=2, grad_accum=1, lora_r=4,
                       save_steps=2, lr=1e-3, seed=0, engine="deepspeed", zero=3)
print(json.dumps({"loss": run_training(options).final_loss, "chunks": rows}))
"""


@pytest.mark.slow
def test_chunked_loss_under_deepspeed_zero3_trains_like_the_whole_loss(models, data, tmp_path):
    """ZeRO-3 gathers a frozen lm_head's weight in hooks around each call; the chunked loss calls it again in
    the backward pass. LoRA on one process with ZeRO-3 (each variant in its own process: DeepSpeed's groups
    outlive a run): chunks of 3 rows give the whole loss's final loss."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    runs = {}
    for name, rows_per_chunk in (("whole", 10**6), ("chunked", 3)):
        done = subprocess.run(
            [sys.executable, "-c", CHUNKED_RUN, str(models), str(data), str(tmp_path / name), str(rows_per_chunk)],
            capture_output=True, text=True, timeout=300, env={**os.environ, "QWENVL_CACHE_DIR": str(tmp_path / "c")},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["whole"]["chunks"] == [] and runs["chunked"]["chunks"] and max(runs["chunked"]["chunks"]) == 3
    assert runs["chunked"]["loss"] == pytest.approx(runs["whole"]["loss"], abs=1e-5)
