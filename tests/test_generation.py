"""Generation: cache vs recompute, stop tokens, sampling settings, and chat prompts as upstream builds them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qwenvl_cli.model.checkpoint import load_checkpoint
from qwenvl_cli.model.generation import ChatSession, GenerationSettings, TextStream, generate, stream_tokens
from qwenvl_cli.model.presets import init_model
from qwenvl_cli.model.processor import QwenVLProcessor


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    init_model("tiny", folder, seed=1)
    model, tokenizer = load_checkpoint(folder)
    return model, tokenizer


@pytest.fixture
def session(loaded, tmp_path):
    model, tokenizer = loaded
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    processor = QwenVLProcessor(tokenizer, model.config.image_size, image_root=tmp_path)
    return ChatSession(model, processor)


def test_cache_and_recompute_generate_the_same_tokens(session):
    inputs = session.prompt(session.make_query("What colour?", ["a.png"]))
    settings = GenerationSettings(max_new_tokens=24)
    cached = generate(session.model, inputs["input_ids"], inputs["pixel_values"], settings)
    settings.use_cache = False
    recomputed = generate(session.model, inputs["input_ids"], inputs["pixel_values"], settings)
    assert len(cached) == 24 and cached == recomputed


def test_stop_tokens_end_generation_and_are_not_returned(session):
    inputs = session.prompt("Hello")
    free = generate(session.model, inputs["input_ids"], None, GenerationSettings(max_new_tokens=12))
    stop = free[5]
    stopped = generate(session.model, inputs["input_ids"], None, GenerationSettings(max_new_tokens=12), [stop])
    assert stopped == free[: free.index(stop)]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(session):
    inputs = session.prompt("Hello")
    ids = inputs["input_ids"]

    def run(seed):
        settings = GenerationSettings(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=seed)
        return generate(session.model, ids, None, settings)

    assert run(7) == run(7)
    assert len({tuple(run(seed)) for seed in range(4)}) > 1


def test_top_k_one_is_greedy(session):
    ids = session.prompt("Hello")["input_ids"]
    greedy = generate(session.model, ids, None, GenerationSettings(max_new_tokens=16))
    top1 = generate(session.model, ids, None, GenerationSettings(max_new_tokens=16, temperature=1.0, top_k=1, seed=0))
    assert top1 == greedy


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    from qwenvl_cli.model.generation import _next_token

    logits = torch.tensor([1.0, 4.0, 3.0, -1.0])
    seen = torch.tensor([1, 3])
    assert _next_token(logits.clone(), seen, GenerationSettings(), None) == 1
    # 4.0 / 2 = 2.0 < 3.0: the seen token loses its lead.
    assert _next_token(logits.clone(), seen, GenerationSettings(repetition_penalty=2.0), None) == 2
    negative = torch.tensor([-2.0, -1.5, -3.0])
    # -1.5 * 2 = -3.0 < -2.0: penalised downwards too.
    assert _next_token(negative, torch.tensor([1]), GenerationSettings(repetition_penalty=2.0), None) == 0


def test_top_p_keeps_only_the_nucleus():
    from qwenvl_cli.model.generation import _next_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    settings = GenerationSettings(temperature=1.0, top_p=0.7)
    picks = {
        _next_token(logits.clone(), torch.tensor([], dtype=torch.long), settings, torch.Generator().manual_seed(s))
        for s in range(200)
    }
    assert picks == {0, 1}


def test_chat_prompt_is_the_upstream_chatml_context(session):
    tokenizer = session.processor.tokenizer
    session.history = [("Picture 1: <img>a.png</img>\nWhat is it?", "A square.")]
    query = session.make_query("And this one?", ["b.png"])
    assert query == "Picture 2: <img>b.png</img>\nAnd this one?"  # numbering continues across turns
    inputs = session.prompt(query)
    pad = tokenizer.img_pad_id
    text = tokenizer.decode([i for i in inputs["input_ids"][0].tolist() if i != pad])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img></img>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA square.<|im_end|>\n"
        "<|im_start|>user\nPicture 2: <img></img>\nAnd this one?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert inputs["pixel_values"].shape == (2, 3, 56, 56)
    assert inputs["image_paths"] == ["a.png", "b.png"]


def test_history_is_trimmed_to_the_window(session):
    session.history = [(f"question {i} " * 20, f"answer {i} " * 20) for i in range(6)]
    full = len(session.prompt("Now?")["input_ids"][0])
    session.max_window_size = full // 2
    trimmed = session.prompt("Now?")["input_ids"][0]
    assert len(trimmed) <= full // 2
    text = session.processor.tokenizer.decode(trimmed.tolist())
    assert "question 5" in text and "question 0" not in text  # the oldest exchanges go first


def test_ask_streams_and_records_history(session):
    pieces = list(session.stream("What colour?", ["a.png"], GenerationSettings(max_new_tokens=10)))
    assert session.history[-1][0] == "Picture 1: <img>a.png</img>\nWhat colour?"
    assert "".join(pieces).strip() == session.history[-1][1]
    answer = session.ask("And now?", settings=GenerationSettings(max_new_tokens=5))
    assert session.history[-1] == ("And now?", answer)
    assert len(session.history) == 2


def test_raw_format_uses_no_template(session):
    session.chat_format = "raw"
    inputs = session.prompt("Picture 1: <img>a.png</img>\nA photo of")
    tokenizer = session.processor.tokenizer
    ids = inputs["input_ids"][0].tolist()
    assert tokenizer.im_start_id not in ids
    assert ids.count(tokenizer.img_pad_id) == 256 and inputs["pixel_values"].shape[0] == 1


def test_text_stream_holds_back_split_utf8(loaded):
    _, tokenizer = loaded
    ids = tokenizer.encode("图中是什么？")
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) == "图中是什么？"
    assert all("\ufffd" not in piece for piece in pieces)


def test_stream_tokens_is_lazy(session):
    inputs = session.prompt("Hi")
    iterator = stream_tokens(session.model, inputs["input_ids"], None, GenerationSettings(max_new_tokens=1000))
    first = [next(iterator) for _ in range(3)]
    iterator.close()
    assert len(first) == 3 and all(isinstance(t, int) for t in first)
    assert torch.is_tensor(inputs["input_ids"])


def test_processor_encodes_a_sample_in_the_data_format_and_collates(session):
    processor = session.processor
    sample = {
        "id": "x",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>a.png</img>\nColour?"},
            {"from": "assistant", "value": "Red."},
        ],
    }
    one = processor.encode_sample(sample)
    two = processor.encode([("user", "Hi"), ("assistant", "Hello")])
    assert one["pixel_values"].shape == (1, 3, 56, 56) and two["pixel_values"] is None
    batch = processor.collate([one, two])
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= one["input_ids"].shape[1]
    assert batch["attention_mask"].sum(1).tolist() == [one["input_ids"].shape[1], two["input_ids"].shape[1]]
    assert (batch["labels"][1, two["input_ids"].shape[1] :] == -100).all()
    assert (batch["input_ids"][1, two["input_ids"].shape[1] :] == processor.tokenizer.eod_id).all()
    assert batch["pixel_values"].shape[0] == 1
    with torch.no_grad():
        out = session.model(**{k: v for k, v in batch.items()}, use_cache=False)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError):
        processor.encode_sample({"id": "y", "conversations": [{"from": "gpt", "value": "x"}]})


def test_padding_rows_and_picture_tokens_are_never_generated_in_chat(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, QwenVLProcessor(tokenizer, model.config.image_size))
    favoured = [*range(len(tokenizer), model.config.vocab_size), tokenizer.img_start_id]

    def favour(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., favoured] += 100.0  # the embedding's padding rows and <img> win every step
        return logits

    hook = model.lm_head.register_forward_hook(favour)
    try:
        raw = generate(model, session.prompt("Hello")["input_ids"], None, GenerationSettings(max_new_tokens=3))
        assert all(token in favoured for token in raw)  # without the chat's settings they would be chosen
        assert tokenizer.decode(raw) == tokenizer.decode([t for t in raw if t < len(tokenizer)])
        answer = session.ask("Hello", settings=GenerationSettings(max_new_tokens=8))
        assert "<img>" not in answer and answer == session.history[-1][1]
    finally:
        hook.remove()


def test_a_picture_token_in_a_decode_step_reads_no_picture(loaded):
    model, tokenizer = loaded
    ids = torch.tensor([tokenizer.encode("Hello there")])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        step = model(input_ids=torch.tensor([[tokenizer.img_start_id]]), cache=out.cache)
    assert torch.isfinite(step.logits).all()
