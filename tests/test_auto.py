"""transformers' Auto classes (and PEFT's) on an official-layout Qwen-VL folder after `import qwenvl_cli`:
no `trust_remote_code`, the native classes, the logits of `load_checkpoint`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qwenvl_cli
from qwenvl_cli.model import auto
from qwenvl_cli.model.checkpoint import load_checkpoint
from qwenvl_cli.model.config import QwenVLConfig
from qwenvl_cli.model.hf_tokenizer import QWenTokenizer
from qwenvl_cli.model.modeling import QwenVLForCausalLM

REPO = Path(__file__).resolve().parents[1]
# What the official Qwen-VL / Qwen-VL-Chat folders carry: pointers at remote-code files (absent here).
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}
TEXT = "Picture 1: <img>a.png</img>\n<ref>the dog</ref><box>(1,2),(3,4)</box> <|im_start|> 图中是什么？ The quick fox"


@pytest.fixture(scope="module")
def official(models, tmp_path_factory) -> Path:
    """The tiny chat model as the official folders are laid out: auto_map in config.json, tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("official") / "Qwen-VL-Chat-tiny"
    shutil.copytree(models / "tiny", folder)
    config = json.loads((folder / "config.json").read_text("utf-8"))
    config["auto_map"] = CONFIG_AUTO_MAP
    (folder / "config.json").write_text(json.dumps(config, indent=2), "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), "utf-8")
    return folder.resolve()


@pytest.fixture(scope="module")
def reference(official):
    return load_checkpoint(official)


def picture_inputs(tokenizer, size: int) -> dict:
    from qwenvl_cli.model.template import ChatTemplate

    encoded = ChatTemplate(tokenizer).encode([("user", "Picture 1: <img>p.png</img>\nWhat colour is the dog?")])
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"input_ids": torch.tensor([encoded.input_ids]), "pixel_values": pixels}


def assert_same_logits(model, reference_model, inputs) -> None:
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, reference_model(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-6


def test_auto_classes_load_an_official_folder_without_remote_code(official, reference):
    from transformers import AutoConfig, AutoModelForCausalLM

    ref_model, tokenizer = reference
    config = AutoConfig.from_pretrained(official)
    assert type(config) is QwenVLConfig and not hasattr(config, "auto_map")
    model = AutoModelForCausalLM.from_pretrained(official)
    assert type(model) is QwenVLForCausalLM and not model.training
    assert_same_logits(model, ref_model, picture_inputs(tokenizer, config.image_size))
    # the same parameters are trainable as after load_checkpoint (the resampler's sin-cos table is frozen)
    assert (
        {n for n, p in model.named_parameters() if not p.requires_grad}
        == {n for n, p in ref_model.named_parameters() if not p.requires_grad}
        == {"transformer.visual.attn_pool.pos_embed"}
    )


def test_trust_remote_code_still_prefers_the_registered_classes(official, tmp_path):
    """With the remote-code files present and `trust_remote_code=True`, transformers takes the locally registered
    config and model classes over the folder's auto_map: the remote files (here: ones that fail) never run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "with-remote-code"
    shutil.copytree(official, folder)
    for name in ("configuration_qwen.py", "modeling_qwen.py"):
        (folder / name).write_text("raise RuntimeError('remote code executed')\n", "utf-8")
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)) is QwenVLConfig
    assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)) is QwenVLForCausalLM


def test_auto_tokenizer_encodes_and_decodes_like_the_qwenvl_tokenizer(official, reference, tmp_path):
    from transformers import AutoTokenizer

    _, qwen = reference
    tokenizer = AutoTokenizer.from_pretrained(official)
    assert type(tokenizer) is QWenTokenizer and len(tokenizer) == len(qwen)
    ids = qwen.encode(TEXT)
    assert tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT) == ids  # the typed <|im_start|> stays text
    assert tokenizer.decode(ids) == qwen.decode(ids) == TEXT
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(TEXT)) == ids
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(TEXT)) == TEXT
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == qwen.eod_id
    assert tokenizer.decode([*ids, qwen.eod_id], skip_special_tokens=True) == qwen.decode(
        [i for i in ids if i < qwen.num_ranks]
    )
    batch = tokenizer(["Hello", TEXT], padding=True, return_tensors="pt")
    assert batch["input_ids"][1].tolist() == ids
    assert batch["attention_mask"][0].sum() == len(qwen.encode("Hello"))
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == (official / "qwen.tiktoken").read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path)(TEXT)["input_ids"] == ids


def test_auto_peft_model_loads_an_adapter_as_qwenvl_does(official, reference, tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwenvl_cli.inference import load_for_inference

    base = AutoModelForCausalLM.from_pretrained(str(official))  # an absolute path, recorded in the adapter
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "w1", "w2"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # random A and B: the adapter changes the logits
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        official
    )
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert type(peft_model.get_base_model()) is QwenVLForCausalLM
    loaded = load_for_inference(official, tmp_path / "adapter")
    inputs = picture_inputs(loaded.tokenizer, loaded.config.image_size)
    assert_same_logits(peft_model, loaded.model, inputs)
    ref_model, _ = reference
    with torch.no_grad():
        assert (peft_model(**inputs).logits - ref_model(**inputs).logits).abs().max() > 1e-3


def test_registration_is_idempotent_and_keeps_a_users_own():
    import importlib

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    importlib.reload(qwenvl_cli)  # importing twice
    auto.install()
    auto.register()
    auto.register()
    assert sum(getattr(f, "qwenvl_auto_registration", False) for f in sys.meta_path) == 1
    # a user registering the same classes again: nothing raised, nothing changed
    AutoConfig.register("qwen", QwenVLConfig)
    AutoModelForCausalLM.register(QwenVLConfig, QwenVLForCausalLM)
    AutoTokenizer.register(QwenVLConfig, tokenizer_class=QWenTokenizer)
    assert CONFIG_MAPPING["qwen"] is QwenVLConfig

    class TheirConfig(QwenVLConfig):
        pass

    AutoConfig.register("qwen", TheirConfig)  # a user's own class for the model type wins, and stays
    try:
        auto.register()
        assert CONFIG_MAPPING["qwen"] is TheirConfig
    finally:
        AutoConfig.register("qwen", QwenVLConfig)


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_import_registers_lazily_on_the_first_use_of_transformers():
    """`import qwenvl_cli` loads neither transformers nor torch; the first import of an auto module registers."""
    out = run_python(
        """
        import sys
        import qwenvl_cli
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
        from qwenvl_cli.model.config import QwenVLConfig
        print(CONFIG_MAPPING["qwen"].__name__, MODEL_FOR_CAUSAL_LM_MAPPING[QwenVLConfig].__name__,
              TOKENIZER_MAPPING[QwenVLConfig].__name__)
        """
    )
    assert out.split() == ["QwenVLConfig", "QwenVLForCausalLM", "QWenTokenizer"]


@pytest.mark.slow
def test_import_after_transformers_registers_at_once_and_keeps_a_users_config():
    out = run_python(
        """
        from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        class TheirConfig(PreTrainedConfig):
            model_type = "qwen"

        AutoConfig.register("qwen", TheirConfig)
        import qwenvl_cli
        from qwenvl_cli.model.config import QwenVLConfig
        print(CONFIG_MAPPING["qwen"].__name__, MODEL_FOR_CAUSAL_LM_MAPPING[QwenVLConfig].__name__)
        """
    )
    assert out.split() == ["TheirConfig", "QwenVLForCausalLM"]
