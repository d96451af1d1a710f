"""Checkpoint folders: init-model, save → load round trips, shards, .bin files, and every refusal."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.model.checkpoint import load_checkpoint, read_generation_config, save_checkpoint
from qwenvl_cli.model.config import QwenVLConfig
from qwenvl_cli.model.presets import build_model, init_model
from qwenvl_cli.model.tokenizer import VOCAB_FILE


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_model("tiny", folder, seed=3)
    return folder


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_init_model_writes_the_official_layout(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        VOCAB_FILE,
    ]
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen" and "auto_map" not in config
    assert config["architectures"] == ["QWenLMHeadModel"]
    assert config["visual"]["output_dim"] == config["hidden_size"] and config["hidden_size"] % 128 == 0
    assert config["num_hidden_layers"] >= 2 and config["visual"]["layers"] >= 2
    assert config["vocab_size"] <= 2048
    assert read_generation_config(tiny_dir)["chat_format"] == "chatml"


def test_load_equals_the_model_that_was_saved(tiny_dir):
    model, tokenizer = load_checkpoint(tiny_dir)
    reference = build_model(QwenVLConfig.from_folder(tiny_dir), seed=3)
    assert_same_weights(model, reference)
    assert not model.training
    assert tokenizer.img_start_id == model.config.image_start_id
    assert not model.transformer.visual.attn_pool.pos_embed.requires_grad


def test_save_load_round_trip_is_bit_exact_with_shards(tiny_dir, tmp_path):
    model, _ = load_checkpoint(tiny_dir)
    out = save_checkpoint(
        model, tmp_path / "sharded", tiny_dir / VOCAB_FILE, {"chat_format": "chatml"}, max_shard_size="400KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / name).is_file() for name in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    again, _ = load_checkpoint(out)
    assert_same_weights(model, again)
    assert QwenVLConfig.from_folder(out).to_official_dict() == QwenVLConfig.from_folder(tiny_dir).to_official_dict()


def test_bf16_save_and_load(tiny_dir, tmp_path):
    model, _ = load_checkpoint(tiny_dir)
    out = save_checkpoint(model, tmp_path / "bf16", tiny_dir / VOCAB_FILE, dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert (config["bf16"], config["fp32"], config["torch_dtype"]) == (True, False, "bfloat16")
    loaded, _ = load_checkpoint(out, dtype="bf16")
    assert loaded.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_bin_checkpoint_is_read_with_weights_only(tiny_dir, tmp_path):
    model, _ = load_checkpoint(tiny_dir)
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", VOCAB_FILE):
        (folder / name).write_bytes((tiny_dir / name).read_bytes())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded, _ = load_checkpoint(folder)
    assert_same_weights(model, loaded)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(QwenvlError, match="cannot be read safely"):
        load_checkpoint(folder)


def test_refusals_name_the_problem(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(QwenvlError, match=r"has no config\.json"):
        load_checkpoint(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QwenvlError, match="not a Qwen-VL config"):
        load_checkpoint(broken)
    (broken / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    with pytest.raises(QwenvlError, match=r"has no qwen\.tiktoken"):
        load_checkpoint(broken)
    (broken / VOCAB_FILE).write_bytes((tiny_dir / VOCAB_FILE).read_bytes())
    with pytest.raises(QwenvlError, match="has no weights"):
        load_checkpoint(broken)
    # A shard named in the index but missing.
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(QwenvlError, match="lacks 1 shard"):
        load_checkpoint(broken)
    (broken / "model.safetensors.index.json").unlink()
    # Tensors that do not belong (another architecture, or a truncated set).
    from safetensors.torch import save_file

    save_file({"model.layers.0.weight": torch.zeros(2)}, str(broken / "model.safetensors"))
    with pytest.raises(QwenvlError, match="does not match the Qwen-VL layout: missing"):
        load_checkpoint(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QwenvlError, match="cannot be read"):
        load_checkpoint(broken)
    config = json.loads((tiny_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(QwenvlError, match="quantised"):
        load_checkpoint(broken)


def test_auto_map_is_ignored(tiny_dir, tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    for path in tiny_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_qwen.py").write_text("raise SystemExit('remote code ran')\n")
    model, _ = load_checkpoint(folder)
    assert "auto_map" not in model.config.to_official_dict()


def test_save_refuses_a_non_empty_folder_and_leaves_it_alone(tiny_dir, tmp_path):
    model, _ = load_checkpoint(tiny_dir)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(QwenvlError, match="is not empty"):
        save_checkpoint(model, target, tiny_dir / VOCAB_FILE)
    assert (target / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary folder left behind


def test_init_model_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["init-model", "--preset", "tiny-base", "-o", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    assert "parameters" in result.stdout
    assert read_generation_config(tmp_path / "base")["chat_format"] == "raw"
    again = runner.invoke(app, ["init-model", "-o", str(tmp_path / "base")])
    assert again.exit_code == 2 and "is not empty" in again.stderr and "--force" in again.stderr
    big = runner.invoke(app, ["init-model", "--preset", "qwen-vl-7b", "-o", str(tmp_path / "big")])
    assert big.exit_code == 2 and "needs the official vocabulary" in big.stderr


def test_qwen_vl_7b_preset_has_the_official_sizes_without_writing_weights(tmp_path, official_vocab):
    result = init_model("qwen-vl-7b", tmp_path / "7b", vocab=official_vocab)
    assert not result["weights_written"]
    config = json.loads((tmp_path / "7b" / "config.json").read_text())
    assert config["vocab_size"] == 151936
    assert config["visual"]["image_start_id"] == 151857
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (4096, 32, 22016)
    assert not (tmp_path / "7b" / "model.safetensors").exists()
    with torch.device("meta"):
        from qwenvl_cli.model.modeling import QwenVLForCausalLM

        model = QwenVLForCausalLM(QwenVLConfig.from_folder(tmp_path / "7b"))
    parameters = sum(p.numel() for p in model.parameters())
    assert 9.5e9 < parameters < 9.8e9  # Qwen-VL: 7.7B LM + 1.9B ViT


def test_recomputed_buffers_in_a_checkpoint_are_skipped(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    model, _ = load_checkpoint(tiny_dir)
    folder = tmp_path / "with-buffers"
    folder.mkdir()
    for name in ("config.json", VOCAB_FILE):
        (folder / name).write_bytes((tiny_dir / name).read_bytes())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["transformer.rotary_emb.inv_freq"] = torch.ones(16)
    save_file(state, str(folder / "model.safetensors"))
    loaded, _ = load_checkpoint(folder)
    assert_same_weights(model, loaded)


def test_transformers_from_pretrained_with_a_device_map_loads_the_same_weights(tiny_dir):
    from qwenvl_cli.model.modeling import QwenVLForCausalLM

    hf = QwenVLForCausalLM.from_pretrained(tiny_dir, device_map="cpu")
    ours, _ = load_checkpoint(tiny_dir)
    assert_same_weights(hf, ours)
