"""`qwenvl merge` on the tiny models (CPU, fp32): exact logits, layout and shards, refusals, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import official_layout
from safetensors import safe_open
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.demo import DEMO_DATA, DEMO_DIR
from qwenvl_cli.merge import MergeResult, merge_adapter
from qwenvl_cli.model.checkpoint import SAFE_INDEX, load_checkpoint
from qwenvl_cli.model.processor import QwenVLProcessor
from qwenvl_cli.train.runner import TrainOptions, run_training

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["merge", *map(str, args)], env={"COLUMNS": "160", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """LoRA runs of 2 steps at a high learning rate (B starts at 0, so it takes steps to move the model):
    on the chat model, and on the base model (which also trains wte and lm_head in full)."""
    root = tmp_path_factory.mktemp("merge-runs")
    data = root / "data"
    shutil.copytree(DEMO_DATA.parent, data, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for name, model in (("chat", "tiny"), ("base", "tiny-base")):
        options = TrainOptions(
            method="lora",
            model=models / model,
            data=data / "train.json",
            output=root / name,
            max_steps=2,
            lora_r=4,
            grad_accum=1,
            lr=1e-2,
            save_steps=100,
        )
        run_training(options)
    return root


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> dict[str, MergeResult]:
    root = tmp_path_factory.mktemp("merged")
    return {
        "chat": merge_adapter(runs / "chat", root / "chat"),
        "base": merge_adapter(runs / "base", root / "base"),
        "sharded": merge_adapter(runs / "chat", root / "sharded", max_shard_size="300KB"),
    }


def copy_run(run, destination):
    shutil.copytree(run, destination, ignore=shutil.ignore_patterns("checkpoints", "loss.png"))
    return destination


def edit_manifest(run, **changes):
    path = run / "qwenvl_run.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def prompts(tokenizer, image_size):
    processor = QwenVLProcessor(tokenizer, image_size, image_root=DEMO_DIR)
    return [
        processor.encode_prompt([("user", "How many shapes are there?")]),
        processor.encode_prompt([("user", "Picture 1: <img>images/shapes_03.png</img>\nWhere is the square?")]),
    ]


def logits_of(model, batches):
    with torch.no_grad():
        return [
            model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], use_cache=False).logits for b in batches
        ]


def adapter_model(base_dir, run):
    from peft import PeftModel

    base, tokenizer = load_checkpoint(base_dir, dtype="fp32")
    return PeftModel.from_pretrained(base, str(run)).eval(), tokenizer


def assert_same_logits(models_dir, base_name, run, out):
    reference, tokenizer = adapter_model(models_dir / base_name, run)
    model, _ = load_checkpoint(out, dtype="fp32")
    batches = prompts(tokenizer, model.config.image_size)
    assert batches[1]["pixel_values"] is not None
    plain, _ = load_checkpoint(models_dir / base_name, dtype="fp32")
    for want, got, before in zip(
        logits_of(reference, batches), logits_of(model, batches), logits_of(plain, batches), strict=True
    ):
        assert (want - before).abs().max() > 1e-3  # the adapter changes the model: the test is not vacuous
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def tensors_of(folder):
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                found[key] = (path.name, handle.get_tensor(key))
    return found


# --- the merged model -----------------------------------------------------------------------------------


def test_chat_lora_merge_gives_the_adapter_models_logits(models, runs, merged):
    result = merged["chat"]
    assert result.written and result.exit_code == 0 and result.lora_layers == 8 and result.modules_to_save == []
    assert result.fingerprint == "matches" and result.dtype == "fp32"
    assert_same_logits(models, "tiny", runs / "chat", Path(result.output))


def test_base_model_lora_merge_carries_the_fully_trained_wte_and_lm_head(models, runs, merged):
    result = merged["base"]
    out = Path(result.output)
    assert result.modules_to_save == ["lm_head", "wte"]
    assert_same_logits(models, "tiny-base", runs / "base", out)
    merged_model, _ = load_checkpoint(out)
    base_model, _ = load_checkpoint(models / "tiny-base")
    with safe_open(str(runs / "base" / "adapter_model.safetensors"), "pt") as handle:
        trained_wte = handle.get_tensor("base_model.model.transformer.wte.weight")
        trained_head = handle.get_tensor("base_model.model.lm_head.weight")
    assert not torch.equal(base_model.transformer.wte.weight, trained_wte)
    assert torch.equal(merged_model.transformer.wte.weight, trained_wte)
    assert torch.equal(merged_model.lm_head.weight, trained_head)


def test_merged_folder_has_the_official_layout_and_keys(models, runs, merged):
    out = Path(merged["chat"].output)
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "qwen.tiktoken", "generation_config.json", "qwenvl_merge.json"}
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen"
    assert (out / "qwen.tiktoken").read_bytes() == (models / "tiny" / "qwen.tiktoken").read_bytes()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == json.loads((runs / "chat" / "generation_config.json").read_text())
    keys = set(tensors_of(out))
    base, _ = load_checkpoint(models / "tiny")
    assert keys == set(base.state_dict())
    assert not any(k.startswith("base_model") or "lora_" in k or "modules_to_save" in k for k in keys)
    provenance = json.loads((out / "qwenvl_merge.json").read_text())
    assert provenance["base_model"] == str((models / "tiny").resolve()) and provenance["lora_layers"] == 8
    assert not list(out.parent.glob(".*merging*"))  # no temporary folder left beside it


def test_a_small_max_shard_size_gives_several_shards_and_a_complete_index(merged):
    result = merged["sharded"]
    out = Path(result.output)
    index = json.loads((out / SAFE_INDEX).read_text())
    found = tensors_of(out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == result.shards >= 3 and not (out / "model.safetensors").exists()
    n = len(shards)
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(found)  # every key mapped, nothing else
    assert all(index["weight_map"][key] == shard for key, (shard, _) in found.items())
    sizes = {key: t.numel() * t.element_size() for key, (_, t) in found.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values()) == result.total_bytes
    for shard in shards:
        held = [sizes[k] for k, (name, _) in found.items() if name == shard.name]
        assert sum(held) <= 300_000 or len(held) == 1  # only a tensor larger than the limit exceeds it
    single = tensors_of(Path(merged["chat"].output))
    assert all(torch.equal(t, single[k][1]) for k, (_, t) in found.items())
    load_checkpoint(out)


def test_dtype_bf16_rounds_the_fp32_merge_once(runs, merged, tmp_path):
    result = merge_adapter(runs / "chat", tmp_path / "bf16", dtype="bf16")
    assert result.dtype == "bf16"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fp32 = tensors_of(Path(merged["chat"].output))
    for key, (_, tensor) in tensors_of(tmp_path / "bf16").items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, fp32[key][1].to(torch.bfloat16)), key


def test_a_checkpoint_of_the_run_merges_with_the_runs_record(runs, merged, tmp_path):
    checkpoint = max((runs / "chat" / "checkpoints").glob("checkpoint-*"))
    result = merge_adapter(checkpoint, tmp_path / "out")
    assert result.fingerprint == "matches" and result.base == merged["chat"].base
    final = tensors_of(Path(merged["chat"].output))
    assert all(torch.equal(t, final[k][1]) for k, (_, t) in tensors_of(tmp_path / "out").items())


# --- the command ----------------------------------------------------------------------------------------


def test_cli_verify_passes_on_a_good_merge(runs, tmp_path):
    result = invoke(runs / "base", "--output", tmp_path / "out", "--verify")
    assert result.exit_code == 0, result.output
    assert "largest logit difference" in result.stdout and "tolerance 1.00e-04" in result.stdout
    assert "wte" in result.stdout and (tmp_path / "out" / "config.json").is_file()
    as_json = invoke(runs / "chat", "--output", tmp_path / "json", "--verify", "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= 1e-4
    assert [p["name"] for p in report["verification"]["prompts"]] == ["text", "image"]


def test_cli_verify_failure_writes_nothing_and_exits_1(runs, tmp_path):
    result = invoke(runs / "chat", "--output", tmp_path / "out", "--verify", "--tolerance", "0")
    assert result.exit_code == 1, result.output
    assert "not written" in result.stdout and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*merging*"))


def test_cli_defaults_to_the_current_run_folder_and_writes_beside_it(runs, tmp_path, monkeypatch):
    run = copy_run(runs / "chat", tmp_path / "my-run")
    monkeypatch.chdir(run)
    result = invoke()
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my-run-merged" / "model.safetensors").is_file()


def test_cli_help_has_examples():
    result = runner.invoke(app, ["merge", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "qwenvl merge runs/chat-lora" in result.stdout and "--max-shard-size" in result.stdout


def refused(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.stderr.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_refuses_a_missing_folder(tmp_path):
    refused(invoke(tmp_path / "nope"), "does not exist", "LoRA training run")


def test_refuses_a_folder_without_adapter_config(tmp_path):
    refused(invoke(tmp_path), "has no adapter_config.json", "not a LoRA adapter folder")


def test_refuses_a_current_directory_that_is_not_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(invoke(), "not a LoRA run folder", "no qwenvl_run.json and no adapter_config.json", "qwenvl merge runs/")


def test_refuses_a_full_fine_tuning_run(tmp_path):
    (tmp_path / "qwenvl_run.json").write_text(json.dumps({"method": "full"}))
    refused(invoke(tmp_path), "full fine-tuning run", "nothing to merge")


def test_refuses_a_missing_base_model(runs, tmp_path):
    run = copy_run(runs / "chat", tmp_path / "run")
    edit_manifest(run, base_model=str(tmp_path / "moved"))
    refused(invoke(run, "--output", tmp_path / "out"), "recorded in", "does not exist", "--base DIR")
    refused(invoke(run, "--base", tmp_path / "also-gone"), "--base", "does not exist")


def test_refuses_a_base_that_differs_from_the_recorded_fingerprint_unless_forced(models, runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(models / "tiny", other)
    config = json.loads((other / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(
        invoke(runs / "chat", "--base", other, "--output", out),
        "is not the model this adapter was trained on",
        "--force",
    )
    assert not out.exists()
    forced = invoke(runs / "chat", "--base", other, "--output", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert "--force" in forced.stdout and (out / "model.safetensors").is_file()
    run = copy_run(runs / "chat", tmp_path / "run")
    edit_manifest(run, base_fingerprint="0" * 64)  # the recorded base model was replaced since training
    refused(invoke(run, "--output", tmp_path / "out2"), "changed since the adapter was trained on it", "--force")


@pytest.mark.parametrize("quant", ["gptq", "nf4"])
def test_refuses_a_qlora_adapter_with_the_reason_and_the_way_out(models, runs, tmp_path, quant):
    run = copy_run(runs / "chat", tmp_path / "run")
    edit_manifest(run, method="qlora", quantisation=quant)
    result = invoke(run, "--output", tmp_path / "out")
    refused(result, "Q-LoRA", "cannot take the LoRA delta exactly", "not supported", "--method lora", "approximate")
    if quant == "gptq":
        assert "--base DIR --force" in result.stderr
    forced = invoke(run, "--output", tmp_path / "out", "--base", models / "tiny", "--force")
    assert forced.exit_code == 0, forced.output
    assert "approximate" in forced.stdout


def test_refuses_a_quantised_base_model(models, runs, tmp_path):
    int4 = tmp_path / "int4"
    shutil.copytree(models / "tiny", int4)
    config = json.loads((int4 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (int4 / "config.json").write_text(json.dumps(config))
    refused(invoke(runs / "chat", "--base", int4, "--force"), "quantised (gptq)", "--base DIR --force")


def test_refuses_a_non_empty_output_without_force(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(invoke(runs / "chat", "--output", out), "is not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    replaced = invoke(runs / "chat", "--output", out, "--force")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_refuses_an_output_that_would_replace_its_sources(models, runs):
    refused(invoke(runs / "chat", "--output", runs / "chat", "--force"), "would replace the adapter folder")
    refused(invoke(runs / "chat", "--output", models, "--force"), "would replace the base model folder")


@pytest.mark.parametrize("size", ["2XB", "0", "-1GB", "big"])
def test_refuses_a_bad_max_shard_size(runs, tmp_path, size):
    refused(
        invoke(runs / "chat", "--output", tmp_path / "out", "--max-shard-size", size),
        f"cannot read the size '{size}'",
        "2GB",
    )
    assert not (tmp_path / "out").exists()


def test_a_failure_while_writing_leaves_nothing_that_looks_complete(runs, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def fail_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_the_second_shard)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(runs / "chat", tmp_path / "new", max_shard_size="300KB")
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(runs / "chat", old, max_shard_size="300KB", force=True)
    assert [p.name for p in old.iterdir()] == ["config.json"]  # the folder it would replace is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no temporary folder left behind


# --------------------------------------------------------------------------------------------------
# What a merge carries over from the base folder (issue: outputs that load where users take them)


def test_a_merge_carries_the_base_folders_files_and_keeps_auto_map(models, runs, tmp_path):
    base = official_layout(models, tmp_path / "Qwen-VL-Chat")
    result = merge_adapter(runs / "chat", tmp_path / "merged", base=base, force=True, dtype="bf16")
    out = Path(result.output)
    for name in ("configuration_qwen.py", "modeling_qwen.py", "visual.py", "tokenization_qwen.py",
                 "qwen_generation_utils.py", "tokenizer_config.json", "SimSun.ttf", "README.md", "LICENSE",
                 "qwen.tiktoken"):  # fmt: skip
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / ".gitattributes").exists()
    config = json.loads((out / "config.json").read_text("utf-8"))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert config["architectures"] == ["QWenLMHeadModel"] and config["model_type"] == "qwen"
    assert config["use_flash_attn"] == "auto"  # a field the native config does not model, kept
    assert (config["bf16"], config["fp16"], config["fp32"], config["torch_dtype"]) == (True, False, False, "bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert all(lack is None for lack in result.consumers.values()), result.consumers
    assert "SimSun.ttf" in result.carried and "modeling_qwen.py" in result.carried
    record = json.loads((out / "qwenvl_merge.json").read_text("utf-8"))
    assert set(record["consumers"].values()) == {"loads"} and "tokenizer_config.json" in record["carried_from_base"]


def test_a_merge_onto_a_folder_without_remote_code_says_which_programs_it_serves(merged, tmp_path):
    consumers = merged["chat"].consumers
    assert consumers["qwenvl (chat, eval, serve-ui, merge --verify, load_checkpoint)"] is None
    remote = next(lack for name, lack in consumers.items() if "trust_remote_code" in name)
    assert "auto_map" in remote and "tokenizer_config.json" in remote
    assert any(name.startswith("vLLM") and lack for name, lack in consumers.items())
    record = json.loads((Path(merged["chat"].output) / "qwenvl_merge.json").read_text("utf-8"))
    assert record["consumers"]["qwenvl (chat, eval, serve-ui, merge --verify, load_checkpoint)"] == "loads"


def test_the_printed_summary_names_what_the_output_lacks(runs, tmp_path):
    result = invoke(runs / "chat", "--output", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "the merged model loads in" in result.output
    assert "✗ transformers AutoModelForCausalLM with trust_remote_code=True" in result.output
    assert "merge onto the downloaded official folder" in result.output


def test_run_folders_name_their_base_for_peft(runs, models):
    """adapter_config.json's base_model_name_or_path is the base folder, absolute: PEFT's
    AutoPeftModelForCausalLM finds the base from the run folder alone."""
    for name, model in (("chat", "tiny"), ("base", "tiny-base")):
        adapter_config = json.loads((runs / name / "adapter_config.json").read_text("utf-8"))
        assert adapter_config["base_model_name_or_path"] == str((models / model).resolve())
    assert set(json.loads((runs / "base" / "adapter_config.json").read_text())["modules_to_save"]) == {"wte", "lm_head"}
