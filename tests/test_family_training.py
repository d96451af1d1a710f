"""Training features of Qwen2-VL, Qwen2.5-VL and Qwen3-VL beyond the plain run (tests/test_families.py):
--min-pixels/--max-pixels (one bound for the template's picture spans, the image processor's patches and
Qwen2.5-VL's pixel boxes, recorded in the run folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_cli.demo import DEMO_DATA
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.families import family_for
from qwenvl_cli.families.hf_vl import PictureDataset, image_processor, pixel_budget

NEW = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
TURNS = [
    ("user", "Picture 1: <img>wide.png</img>\nWhere is it?"),
    ("assistant", "<ref>it</ref><box>(0,0),(500,500)</box>"),
]


# -- --min-pixels / --max-pixels -------------------------------------------------------------------------------------
def test_pixel_bounds_are_rounded_to_whole_tokens_and_checked(vl_models):
    family = family_for(vl_models / "qwen2-vl")  # 14-pixel patches merged 2×2: a token is 28² = 784 pixels
    folder = vl_models / "qwen2-vl"
    assert family.picture_pixels(folder, None, None, 64) is None
    folder_min, folder_max = pixel_budget(image_processor(folder))[2:]
    assert family.picture_pixels(folder, None, 5000, 64) == (folder_min, 6 * 784)  # max rounded down
    assert family.picture_pixels(folder, 1000, 5000, 64) == (2 * 784, 6 * 784)  # min rounded up
    assert family.picture_pixels(folder, 784, None, 64) == (784, folder_max)
    with pytest.raises(QwenvlError, match="less than one token"):
        family.picture_pixels(folder, None, 700, 64)
    with pytest.raises(QwenvlError, match=r"--min-pixels .* is more than --max-pixels"):
        family.picture_pixels(folder, 4000, 3200, 64)  # 4000 → 4704 > 3136
    with pytest.raises(QwenvlError, match=r"at least 22 tokens .* more than --max-length 20"):
        family.picture_pixels(folder, 20 * 784, 30 * 784, 20)
    qwen3 = family_for(vl_models / "qwen3-vl")  # 16-pixel patches: 32² = 1024 pixels a token
    assert qwen3.picture_pixels(vl_models / "qwen3-vl", 1024, 3000, 64) == (1024, 2048)


def test_pixel_bounds_are_refused_for_qwen_vl_v1(models):
    family = family_for(models / "tiny")
    assert family.picture_pixels(models / "tiny", None, None, 64) is None
    with pytest.raises(QwenvlError, match="one fixed size") as refused:
        family.picture_pixels(models / "tiny", None, 100_000, 64)
    assert "Drop --min-pixels and --max-pixels" in refused.value.fix


@pytest.mark.parametrize("name", NEW)
def test_the_template_the_processor_and_the_boxes_follow_the_run_bounds(vl_models, tmp_path, name):
    Image.new("RGB", (600, 300), (10, 200, 30)).save(tmp_path / "wide.png")
    folder = vl_models / name
    family = family_for(folder)
    tokenizer = family.tokenizer(folder)
    patch, merge, _, _ = pixel_budget(image_processor(folder))
    unit = (patch * merge) ** 2
    default = family.template(tokenizer, image_root=tmp_path).encode(TURNS)
    for tokens in (2, 8, 32):
        pixels = family.picture_pixels(folder, unit, tokens * unit, 4096)
        template = family.template(tokenizer, image_root=tmp_path, pixels=pixels, max_length=4096)
        encoded = template.encode(TURNS)
        # the pad count follows the bound: at most `tokens`, and what transformers' processor makes of it
        assert encoded.image_lengths[0] - 2 <= tokens
        official = family.load_processor(folder)
        official.image_processor = image_processor(folder, pixels)
        picture = Image.open(tmp_path / "wide.png").convert("RGB")
        made = official(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[picture])
        assert encoded.image_lengths[0] - 2 == made["input_ids"][0].count(official.image_token_id)
        # the dataset's patches agree with the spans (PictureDataset raises when they do not)
        pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        item = PictureDataset([encoded], folder, tmp_path, pad, pixels)[0]
        assert int(item["image_grid_thw"].prod()) // merge**2 == encoded.image_lengths[0] - 2
        assert int(item["mm_token_type_ids"].sum()) == encoded.image_lengths[0] - 2
        learned = zip(encoded.input_ids, encoded.labels, strict=True)
        answer = tokenizer.decode([i for i, label in learned if label != -100])
        if name == "qwen2.5-vl":  # absolute pixels of the resized picture: (500,500) of 1000 is its middle
            height, width = template.resized("wide.png")
            assert f'"bbox_2d": [0, 0, {round(width / 2)}, {round(height / 2)}]' in answer
        else:  # relative coordinates do not depend on the size
            assert answer == tokenizer.decode(
                [i for i, label in zip(default.input_ids, default.labels, strict=True) if label != -100]
            )
    # a picture that cannot fit --max-length is named
    pixels = family.picture_pixels(folder, unit, 32 * unit, 4096)
    with pytest.raises(QwenvlError, match=r"picture wide\.png takes \d+ tokens .* more than --max-length 12"):
        family.template(tokenizer, image_root=tmp_path, pixels=pixels, max_length=12).encode(TURNS)


def test_a_run_with_max_pixels_trains_and_records_the_bounds_in_its_processor_files(vl_models, tmp_path):
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    folder = vl_models / "qwen2.5-vl"
    out = tmp_path / "run"
    options = TrainOptions(
        model=folder,
        data=DEMO_DATA,
        output=out,
        max_steps=1,
        grad_accum=1,
        lora_r=4,
        min_pixels=2 * 784,
        max_pixels=9 * 784 + 100,
        save_steps=1,
    )
    result = run_training(options)
    assert result.global_step == 1
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 2 * 784, "longest_edge": 9 * 784}
    bundled = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert bundled["size"] == saved["size"]
    assert pixel_budget(image_processor(out))[2:] == (2 * 784, 9 * 784)
    # the base folder is untouched
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"]["longest_edge"] != 9 * 784
    manifest = json.loads((out / "qwenvl_run.json").read_text())
    assert manifest["arguments"]["max_pixels"] == 9 * 784 + 100


def test_the_cli_refuses_pixel_bounds_for_qwen_vl_v1(models, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    result = CliRunner().invoke(
        app,
        ["train", "--model", str(models / "tiny"), "--max-pixels", "200000", "--dry-run", "-o", str(tmp_path / "r")],
        env={"COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert result.exit_code != 0
    assert "one fixed size" in result.output
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    for flag in ("--min-pixels", "--max-pixels", "--vision-lr", "--merger-lr", "--packing"):
        assert flag in help_text


def test_record_pixels_updates_older_min_max_keys(vl_models, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    settings = json.loads((vl_models / "qwen2-vl" / "preprocessor_config.json").read_text())
    settings |= {"min_pixels": 1, "max_pixels": 2}  # the official Qwen2-VL files carry these beside size
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    family_for(vl_models / "qwen2-vl").record_pixels(folder, (784, 7840))
    written = json.loads((folder / "preprocessor_config.json").read_text())
    assert (written["min_pixels"], written["max_pixels"]) == (784, 7840)
    assert written["size"] == {"shortest_edge": 784, "longest_edge": 7840}
    assert not Path(folder / "processor_config.json").exists()


# -- --vision-lr / --merger-lr -----------------------------------------------------------------------------------------
def test_each_parameter_is_language_vision_or_merger(vl_models, models):
    from transformers import AutoModelForImageTextToText

    for name in NEW:
        model = AutoModelForImageTextToText.from_pretrained(vl_models / name)
        family = family_for(vl_models / name)
        parts = {n: family.parameter_part(n) for n, _ in model.named_parameters()}
        assert all(part == "vision" for n, part in parts.items() if ".visual.blocks." in n)
        assert all(part == "merger" for n, part in parts.items() if ".visual.merger." in n)
        assert all(part == "language" for n, part in parts.items() if "language_model" in n or "lm_head" in n)
        assert {"language", "vision", "merger"} == set(parts.values())
        if name == "qwen3-vl":
            deepstack = [n for n in parts if "deepstack_merger_list" in n]
            assert deepstack and all(parts[n] == "merger" for n in deepstack)
        # PEFT's names keep the parts
        assert family.parameter_part("base_model.model.model.visual.merger.mlp.0.lora_A.default.weight") == "merger"
    v1 = family_for(models / "tiny")
    assert v1.parameter_part("transformer.visual.attn_pool.kv_proj.weight") == "merger"
    assert v1.parameter_part("transformer.visual.transformer.resblocks.0.attn.in_proj.weight") == "vision"
    assert v1.parameter_part("transformer.h.0.attn.c_attn.weight") == "language"


def test_optimizer_groups_carry_each_parts_rate_and_leave_frozen_parts_out(vl_models):
    from transformers import AutoModelForImageTextToText

    from qwenvl_cli.train.method import parameter_groups
    from qwenvl_cli.train.options import TrainOptions

    family = family_for(vl_models / "qwen3-vl")
    model = AutoModelForImageTextToText.from_pretrained(vl_models / "qwen3-vl")
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {n for n in names.values() if n.endswith("weight") and "norm" not in n}
    options = TrainOptions(method="full", vision_lr=1e-6, merger_lr=3e-5, weight_decay=0.1)
    for train_vision in (False, True):
        family.prepare_full(model, train_vision=train_vision)
        groups = parameter_groups(model, family, options, 1e-4, decay)
        rates = {group["part"]: group["lr"] for group in groups}
        expected = {"language": 1e-4, "merger": 3e-5} | ({"vision": 1e-6} if train_vision else {})
        assert rates == expected
        grouped = [names[id(p)] for group in groups for p in group["params"]]
        assert len(grouped) == len(set(grouped))
        assert set(grouped) == {n for n, p in model.named_parameters() if p.requires_grad}
        assert train_vision == any(".visual.blocks." in n for n in grouped)
        # deepstack_merger_list counts as merger, and trains with the vision tower (the official default, §6)
        deepstack = [g["part"] for g in groups for p in g["params"] if "deepstack_merger_list" in names[id(p)]]
        assert deepstack == (["merger"] * len(deepstack) if train_vision else [])
        assert not train_vision or deepstack
        for group in groups:
            assert all(family.parameter_part(names[id(p)]) == group["part"] for p in group["params"])
            assert group["weight_decay"] == (0.1 if names[id(group["params"][0])] in decay else 0.0)
    # without the flags every part has --lr
    plain = parameter_groups(model, family, TrainOptions(method="full"), 2e-4, decay)
    assert {group["lr"] for group in plain} == {2e-4}


def test_a_full_run_trains_each_part_at_its_rate(vl_models, tmp_path):
    from transformers import AutoModelForImageTextToText

    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    folder = vl_models / "qwen2-vl"
    out = tmp_path / "run"
    options = TrainOptions(
        method="full",
        model=folder,
        data=DEMO_DATA,
        output=out,
        max_steps=2,
        grad_accum=1,
        lr=1e-2,
        vision_lr=1e-2,  # implies --train-vit
        merger_lr=0.0,  # the merger trains at rate 0: it must not move
        lr_scheduler="constant",
        save_steps=2,
    )
    result = run_training(options)
    assert any("--vision-lr" in note for note in result.notes)
    base = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    trained = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    moved = {key for key, value in trained.items() if not torch.equal(value, base[key])}
    assert any(".visual.blocks." in key for key in moved)
    assert any("language_model" in key for key in moved)
    assert not any(".visual.merger." in key for key in moved)


def test_part_rates_without_a_trainable_part_are_refused(vl_models, models, tmp_path):
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    for folder in (vl_models / "qwen2.5-vl", models / "tiny"):
        for flag in ("vision_lr", "merger_lr"):
            options = TrainOptions(
                method="lora", model=folder, data=DEMO_DATA, output=tmp_path / "r", dry_run=True, **{flag: 1e-5}
            )
            with pytest.raises(QwenvlError, match=f"--{flag.replace('_', '-')} sets the learning rate") as refused:
                run_training(options)
            assert "--lora-targets" in refused.value.fix
    # v1's merger is its resampler: full fine-tuning trains it, so --merger-lr is taken
    options = TrainOptions(
        method="full", model=models / "tiny", data=DEMO_DATA, output=tmp_path / "v1", dry_run=True, merger_lr=1e-5
    )
    assert run_training(options).dry_run


# -- --packing ---------------------------------------------------------------------------------------------------------
def summed_token_loss(model, inputs) -> torch.Tensor:
    """Σ of the next-token cross-entropy over the supervised positions of a batch."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("name", NEW)
def test_a_packed_rows_summed_loss_equals_its_samples_alone(vl_models, tmp_path, name):
    from transformers import AutoModelForImageTextToText

    from qwenvl_cli.train.data import prepare_samples

    Image.new("RGB", (300, 120), (200, 30, 30)).save(tmp_path / "wide.png")
    folder = vl_models / name
    family = family_for(folder)
    tokenizer = family.tokenizer(folder)
    demo = json.loads(DEMO_DATA.read_text())
    text_only = {
        "id": "t",
        "conversations": [{"from": "user", "value": "Hi?"}, {"from": "assistant", "value": "Hello."}],
    }
    wide = {
        "id": "w",
        "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{tmp_path / 'wide.png'}</img>\nColour?"},
            {"from": "assistant", "value": "Red."},
        ],
    }
    data = tmp_path / "data.json"
    data.write_text(json.dumps([demo[0], text_only, wide, demo[1]]))
    template = family.template(tokenizer, image_root=DEMO_DATA.parent)
    samples = prepare_samples(data, template, 512, family.picture_tokens(), DEMO_DATA.parent).samples
    config = family.config(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    collate = family.collator(tokenizer)
    rows = [[0, 1, 2], [3]]  # a row of three samples (a text-only one between pictures) and a row of one
    packed = family.training_dataset(samples, config, DEMO_DATA.parent, 512, rows)
    batch = collate([packed[0], packed[1]])
    assert batch["attention_mask"][0].max() == 3 and batch["attention_mask"][1].max() == 1
    inputs = family.training_inputs(model, batch, packed=True)
    assert inputs["attention_mask"] is None and inputs["position_ids"].shape == (4, *batch["input_ids"].shape)
    wrapper = torch.nn.Module()  # as DDP hands the model to the Trainer's compute_loss
    wrapper.module = model
    assert torch.equal(family.training_inputs(wrapper, batch, packed=True)["position_ids"], inputs["position_ids"])
    first = len(samples[0])
    assert inputs["position_ids"][0, 0, first] == 0  # the second sample's text positions restart
    alone = family.training_dataset(samples, config, DEMO_DATA.parent, 512)
    with torch.no_grad():
        packed_loss = summed_token_loss(model, inputs)
        single = [summed_token_loss(model, collate([alone[i]])) for i in range(len(samples))]
        # its positions are each sample's own: the M-RoPE rows of the second sample equal those it gets alone
        own, _ = model.model.get_rope_index(
            collate([alone[2]])["input_ids"], collate([alone[2]])["mm_token_type_ids"], alone[2]["image_grid_thw"]
        )
        start = first + len(samples[1])
        assert torch.equal(inputs["position_ids"][1:, 0, start : start + len(samples[2])], own[:, 0, : len(samples[2])])
    assert torch.allclose(packed_loss, sum(single), rtol=0, atol=1e-4 * len(samples)), (packed_loss, single)
    # the unpacked batch passes unchanged, and attention across samples would change the loss
    plain = collate([alone[0]])
    assert family.training_inputs(model, plain, packed=True) is plain
    # a run without --packing passes every batch unchanged without reading its mask on the host (a GPU sync)
    from qwenvl_cli.step_trace import SyncCensus

    census = SyncCensus(cuda_only=False)
    census.start()
    try:
        assert family.training_inputs(model, plain) is plain
    finally:
        census.stop()
    assert census.sites() == []
    leaky = dict(inputs, use_cache=True)  # with a cache transformers ignores packed positions: one causal span
    with torch.no_grad():
        assert not torch.allclose(summed_token_loss(model, leaky), sum(single), atol=1e-2)


def test_qwenvl_train_packing_runs_for_a_family(vl_models, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    out = tmp_path / "run"
    args = ["train", "--model", str(vl_models / "qwen3-vl"), "--data", str(DEMO_DATA), "--packing"]
    args += ["--max-length", "256", "--max-steps", "2", "--grad-accum", "1", "--lora-r", "4", "--output", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "qwenvl_run.json").read_text())
    assert manifest["arguments"]["packing"] is True and manifest["global_step"] == 2
    state = json.loads(next((out / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in state["log_history"] if "loss" in e)
    import re

    packed = re.search(r"packing: (\d+) samples in (\d+) rows", " ".join(result.output.split()))
    assert packed and int(packed[2]) < int(packed[1])  # rows of several samples were trained


# -- Q-LoRA (NF4) ------------------------------------------------------------------------------------------------------
def test_nf4_loading_quantises_the_language_model_only(vl_models):
    bnb = pytest.importorskip("bitsandbytes")
    folder = vl_models / "qwen3-vl"
    model, _ = family_for(folder).load(folder, "fp32", "cpu", quant="nf4")
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(".language_model." in f".{n}." for n in four_bit)
    assert any(n.endswith("mlp.down_proj") for n in four_bit) and any(n.endswith("self_attn.q_proj") for n in four_bit)
    plain = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert "lm_head" in plain and any(".visual.merger." in f".{n}." for n in plain)
    assert not any(".language_model." in f".{n}." for n in plain)
    with pytest.raises(QwenvlError, match="gptq"):
        family_for(folder).load(folder, "fp32", "cpu", quant="gptq")


def test_qlora_trains_a_family_model_and_its_adapter_loads(vl_models, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    folder = vl_models / "qwen2.5-vl"
    out = tmp_path / "run"
    options = TrainOptions(
        method="qlora", model=folder, data=DEMO_DATA, output=out, max_steps=2, grad_accum=1, lora_r=4, save_steps=2
    )
    result = run_training(options)
    assert result.global_step == 2 and result.final_loss == result.final_loss  # not NaN
    manifest = json.loads((out / "qwenvl_run.json").read_text())
    assert (manifest["method"], manifest["quantisation"]) == ("qlora", "nf4")
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder), out)
    wrapped = [n for n, m in loaded.named_modules() if "lora_A" in dict(m.named_children())]
    assert wrapped and all(".language_model." in n for n in wrapped)
    trained = {k for k in loaded.state_dict() if "lora_B" in k}
    assert any(loaded.state_dict()[k].abs().sum() > 0 for k in trained)  # the adapters moved from their zero start
    merged = CliRunner().invoke(app, ["merge", str(out), "--output", str(tmp_path / "m")], env={"COLUMNS": "160"})
    assert merged.exit_code != 0 and "NF4" in merged.output


def test_a_resumed_run_must_keep_the_picture_bounds_and_the_group_layout(vl_models, tmp_path):
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.presets import resolve_rules
    from qwenvl_cli.train.resume import run_identity

    def identity(**changes):
        options = TrainOptions(model=vl_models / "qwen2-vl", data=DEMO_DATA, **changes)
        return run_identity(options, vl_models / "qwen2-vl", "f", resolve_rules("lora"), "sha", None)

    plain = identity()
    assert plain["min_pixels"] is None and plain["part_learning_rates"] is None  # as runs written before
    assert identity(max_pixels=7840) != plain
    assert identity(vision_lr=1e-5) != plain
    assert identity(merger_lr=1e-5) == identity(merger_lr=2e-5)  # a rate may change, the groups may not


def test_eval_data_is_scored_during_training_for_a_family(vl_models, tmp_path):
    """--eval-data with a Qwen2.5-VL model: the eval loss and answers asked through the family's chat session at
    step 0 (before), every --eval-every steps and at the end, recorded in the run folder."""
    from qwenvl_cli.data.synth import synthesize
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    synthesize(tmp_path / "syn", n=24, seed=3)
    events = []
    options = TrainOptions(
        model=vl_models / "qwen2.5-vl",
        data=tmp_path / "syn" / "train.json",
        eval_data=tmp_path / "syn" / "eval.json",
        output=tmp_path / "run",
        method="lora",
        lora_r=4,
        max_steps=4,
        grad_accum=1,
        eval_every=2,
        eval_samples=2,
        save_steps=100,
    )
    result = run_training(options, lambda kind, payload: events.append((kind, payload)))
    evals = [payload for kind, payload in events if kind == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for record in evals:
        assert record["eval_loss"] > 0 and record["questions"] >= 2
        assert 0.0 <= record["accuracy"] <= 1.0
    manifest = json.loads((tmp_path / "run" / "qwenvl_run.json").read_text())
    assert manifest["evaluations"] == result.evaluations == evals


def test_a_family_run_cut_after_its_first_save_resumes_to_the_same_adapter(vl_models, tmp_path):
    """Resume for a newer family: a Qwen2.5-VL LoRA run stopped at its first checkpoint continues with
    --resume auto and ends with the adapter of a run that was never stopped."""
    from safetensors.torch import load_file

    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    def options(out, **extra):
        return TrainOptions(
            model=vl_models / "qwen2.5-vl", data=DEMO_DATA, output=out, method="lora", lora_r=4,
            lora_dropout=0.0, max_steps=4, grad_accum=1, save_steps=2, seed=0, **extra,
        )  # fmt: skip

    run_training(options(tmp_path / "straight"))

    def interrupt_after_first_save(kind, payload):
        if kind == "save":
            raise KeyboardInterrupt

    with pytest.raises(QwenvlError, match="--resume auto"):
        run_training(options(tmp_path / "cut"), interrupt_after_first_save)
    resumed = run_training(options(tmp_path / "cut", resume="auto"))
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 4
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
