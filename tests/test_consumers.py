"""What qwenvl writes, loaded the ways users load it: a LoRA run made from an official-layout folder and its
merge, through qwenvl's own loader, transformers' Auto classes (after `import qwenvl_cli`, no remote code),
transformers with the folder's remote code (`trust_remote_code=True`; stand-in files written by the tests,
see helpers.REMOTE_CODE) and PEFT's AutoPeftModelForCausalLM — the same logits every way."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import official_layout

import qwenvl_cli  # noqa: F401 - registers the native classes with transformers' Auto classes
from qwenvl_cli.demo import DEMO_DATA, DEMO_DIR
from qwenvl_cli.merge import merge_adapter
from qwenvl_cli.model.checkpoint import load_checkpoint
from qwenvl_cli.model.processor import QwenVLProcessor
from qwenvl_cli.train.runner import TrainOptions, run_training


@pytest.fixture(scope="module")
def made(models, tmp_path_factory):
    """An official-layout base, a 2-step LoRA run on it, and the run merged."""
    root = tmp_path_factory.mktemp("consumers")
    base = official_layout(models, root / "Qwen-VL-Chat")
    data = root / "data"
    shutil.copytree(DEMO_DATA.parent, data, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    options = TrainOptions(
        method="lora",
        model=base,
        data=data / "train.json",
        output=root / "run",
        max_steps=2,
        lora_r=4,
        grad_accum=1,
        lr=1e-2,
        save_steps=100,
    )
    run_training(options)
    merged = merge_adapter(root / "run", root / "merged")
    return {"base": base, "run": root / "run", "merged": root / "merged", "result": merged}


def batches(tokenizer, image_size: int) -> list[dict]:
    processor = QwenVLProcessor(tokenizer, image_size, image_root=DEMO_DIR)
    return [
        processor.encode_prompt([("user", "How many shapes are there?")]),
        processor.encode_prompt([("user", "Picture 1: <img>images/shapes_03.png</img>\nWhere is the square?")]),
    ]


def logits(model, prompts: list[dict]) -> list[torch.Tensor]:
    model.eval()
    out = []
    with torch.no_grad():
        for batch in prompts:
            pixels = batch["pixel_values"]
            out.append(
                model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=None if pixels is None else pixels.float(),
                ).logits.float()
            )
    return out


def assert_same(expected: list[torch.Tensor], got: list[torch.Tensor], atol: float = 1e-5) -> None:
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max().item()


@pytest.fixture(scope="module")
def reference(made):
    """qwenvl's own loader on the merged folder: what every other way must give."""
    model, tokenizer = load_checkpoint(made["merged"], dtype="fp32")
    prompts = batches(tokenizer, model.config.image_size)
    return prompts, logits(model, prompts)


def test_transformers_auto_classes_load_the_merged_folder_without_remote_code(made, reference):
    from transformers import AutoConfig, AutoModelForCausalLM

    prompts, expected = reference
    config = AutoConfig.from_pretrained(made["merged"])
    assert config.model_type == "qwen"
    model = AutoModelForCausalLM.from_pretrained(made["merged"], dtype=torch.float32)
    assert type(model).__module__.startswith("qwenvl_cli.")  # the native class, not remote code
    assert_same(expected, logits(model, prompts))


REMOTE_CODE_RUN = """
import sys, torch
from transformers import AutoModelForCausalLM  # a user's process: qwenvl_cli is never imported by the user

folder, prompts_file, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = [
        model(input_ids=p["input_ids"], attention_mask=p["attention_mask"], pixel_values=p["pixel_values"]).logits
        for p in torch.load(prompts_file)
    ]
torch.save({"class": type(model).__name__, "module": type(model).__module__, "logits": logits}, out)
"""


def test_transformers_with_the_folders_remote_code_loads_the_merged_folder(made, reference, tmp_path):
    """The merge carried the base folder's remote code and config.json's auto_map: a process that has not
    imported qwenvl_cli (as vLLM's or a user's own) loads the merged folder through them. (Where qwenvl_cli is
    imported, transformers prefers its registered native class even with trust_remote_code=True.)"""
    import subprocess
    import sys

    prompts, expected = reference
    torch.save(prompts, tmp_path / "prompts.pt")
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_RUN, str(made["merged"]), str(tmp_path / "prompts.pt"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(tmp_path / "o")
    assert loaded["class"] == "QWenLMHeadModel" and "transformers_modules" in loaded["module"]
    assert_same(expected, [logit.float() for logit in loaded["logits"]])


def test_peft_loads_the_run_folder_alone(made):
    """AutoPeftModelForCausalLM finds the base from adapter_config.json and gives the adapter model's logits."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    base, tokenizer = load_checkpoint(made["base"], dtype="fp32")
    prompts = batches(tokenizer, base.config.image_size)
    expected = logits(PeftModel.from_pretrained(base, str(made["run"])), prompts)
    model = AutoPeftModelForCausalLM.from_pretrained(str(made["run"]), dtype=torch.float32)
    assert_same(expected, logits(model, prompts))
    # and the merge of that run is the same model
    merged, _ = load_checkpoint(made["merged"], dtype="fp32")
    assert_same(expected, logits(merged, prompts), atol=1e-4)


def test_the_merge_says_it_serves_every_consumer(made):
    assert all(lack is None for lack in made["result"].consumers.values()), made["result"].consumers


def test_peft_reloads_a_base_model_lora_with_its_trained_embeddings(models, tmp_path):
    """LoRA on a base model also trains wte and lm_head (modules_to_save): AutoPeftModelForCausalLM on the run
    folder alone reloads those trained copies, with the logits of the adapter model qwenvl loads."""
    from peft import AutoPeftModelForCausalLM

    from qwenvl_cli.inference import load_for_inference

    data = tmp_path / "data"
    shutil.copytree(DEMO_DATA.parent, data, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    run = tmp_path / "run"
    run_training(
        TrainOptions(method="lora", model=models / "tiny-base", data=data / "train.json", output=run,
                     max_steps=2, lora_r=4, grad_accum=1, lr=1e-2, save_steps=100)
    )  # fmt: skip
    loaded = load_for_inference(models / "tiny-base", run)
    prompts = batches(loaded.tokenizer, loaded.config.image_size)
    expected = logits(loaded.model, prompts)
    base_only, _ = load_checkpoint(models / "tiny-base", dtype="fp32")
    assert not torch.allclose(expected[0], logits(base_only, prompts)[0])  # the run changed the model
    model = AutoPeftModelForCausalLM.from_pretrained(str(run), dtype=torch.float32)
    assert {"wte", "lm_head"} <= set(model.peft_config["default"].modules_to_save)
    assert_same(expected, logits(model, prompts))
