"""The native Qwen-VL model against the behaviour DESIGN.md lists, on the tiny preset (CPU, fp32).

Each fact is checked against a reference written out here from the formula, not against the code
under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwenvl_cli.model.config import QwenVLConfig
from qwenvl_cli.model.modeling import (
    QwenVLForCausalLM,
    RMSNorm,
    apply_rotary,
    causal_lm_loss,
    logn_scale,
    ntk_alpha,
)
from qwenvl_cli.model.presets import build_model, preset_config, tiny_ranks
from qwenvl_cli.model.template import IGNORE_INDEX, ChatTemplate
from qwenvl_cli.model.tokenizer import QwenVLTokenizer

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def tokenizer() -> QwenVLTokenizer:
    return QwenVLTokenizer(tiny_ranks(), "tiny")


@pytest.fixture(scope="module")
def config(tokenizer) -> QwenVLConfig:
    return preset_config("tiny", tokenizer.num_ranks)


@pytest.fixture(scope="module")
def model(config) -> QwenVLForCausalLM:
    return build_model(config, seed=0).eval()


def small_model(config: QwenVLConfig, **changes) -> QwenVLForCausalLM:
    """The tiny model with some config fields changed, same seed (so same weights)."""
    data = config.to_official_dict()
    data.pop("model_type")
    data.update(changes)
    return build_model(QwenVLConfig(**data), seed=0).eval()


def picture_sample(tokenizer, text: str = "What colour?", answer: str = "Red.", pictures: int = 1):
    labels = "".join(f"Picture {i + 1}: <img>p{i}.png</img>\n" for i in range(pictures))
    encoded = ChatTemplate(tokenizer).encode([("user", labels + text), ("assistant", answer)])
    ids = torch.tensor([encoded.input_ids])
    generator = torch.Generator().manual_seed(pictures)
    pixels = torch.randn(pictures, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return ids, torch.tensor([encoded.labels]), pixels, encoded


# --- norms, rotary, NTK, logn ----------------------------------------------------------------------


def test_rmsnorm_is_computed_in_fp32_then_cast_then_scaled():
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 40).to(torch.bfloat16)
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight
    assert torch.equal(norm(x), expected)
    all_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert not torch.equal(norm(x), all_bf16)  # the fp32 path is observable


def test_rotary_rotates_half_pairs_at_each_position():
    head_dim, base = 8, 10000.0
    x = torch.randn(1, 5, 2, head_dim, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(3, 8)  # a cache offset of 3
    inv = [base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    angles = torch.tensor([[p * f for f in inv] for p in positions.tolist()])
    emb = torch.cat((angles, angles), -1)
    out = apply_rotary(x, emb.cos(), emb.sin())
    half = head_dim // 2
    for s, p in enumerate(positions.tolist()):
        for i in range(half):
            c, sn = math.cos(p * inv[i]), math.sin(p * inv[i])
            a, b = x[0, s, :, i], x[0, s, :, i + half]
            torch.testing.assert_close(out[0, s, :, i], a * c - b * sn, atol=1e-5, rtol=0)
            torch.testing.assert_close(out[0, s, :, i + half], b * c + a * sn, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("rot_dim", "packed"), [(8, False), (8, True), (4, False)])
def test_rotary_equals_the_rotate_half_formula_bit_for_bit(rot_dim, packed):
    """The sign of rotate-half is folded into sin and the halves swapped with a roll: the result is the
    formula's to the bit, in bf16 as in fp32, for a whole and a partly rotated head, and per-row tables."""
    generator = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 3, 8, generator=generator).to(dtype)
        shape = (2, 5, rot_dim // 2) if packed else (5, rot_dim // 2)
        angles = torch.rand(shape, generator=generator) * 50
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        c, s_ = (cos[:, :, None, :], sin[:, :, None, :]) if packed else (cos[None, :, None, :], sin[None, :, None, :])
        x32 = x.float()
        head, rest = x32[..., :rot_dim], x32[..., rot_dim:]
        half = rot_dim // 2
        rotated_half = torch.cat((-head[..., half:], head[..., :half]), -1)
        expected = torch.cat((head * c + rotated_half * s_, rest), -1).to(dtype)
        assert torch.equal(apply_rotary(x, cos, sin), expected)


@pytest.mark.parametrize(
    ("seq_len", "trained", "alpha"),
    [(100, 2048, 1), (2048, 2048, 1), (2049, 2048, 3), (4096, 2048, 3), (4097, 2048, 7), (20, 8, 7), (8, 8, 1)],
)
def test_ntk_alpha(seq_len, trained, alpha):
    assert ntk_alpha(seq_len, trained) == alpha
    assert ntk_alpha(seq_len, trained) == max(2 ** math.ceil(math.log2(seq_len / trained) + 1) - 1, 1)


def test_logn_scale_only_past_the_trained_length():
    positions = torch.arange(0, 20)
    scale = logn_scale(positions, 8)
    expected = [math.log(p + 1) / math.log(8) if p + 1 > 8 else 1.0 for p in range(20)]
    torch.testing.assert_close(scale, torch.tensor(expected), atol=1e-7, rtol=0)
    assert logn_scale(torch.arange(0, 8), 8) is None


def test_ntk_and_logn_apply_in_eval_prefill_only(config, tokenizer):
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog " * 3)])
    assert ids.shape[1] > 16
    plain = small_model(config, seq_length=8, use_dynamic_ntk=False, use_logn_attn=False)
    ntk = small_model(config, seq_length=8, use_dynamic_ntk=True, use_logn_attn=False)
    logn = small_model(config, seq_length=8, use_dynamic_ntk=False, use_logn_attn=True)
    with torch.no_grad():
        base = plain(input_ids=ids, use_cache=False).logits
        with_ntk = ntk(input_ids=ids, use_cache=False).logits
        with_logn = logn(input_ids=ids, use_cache=False).logits
    assert ntk.transformer.rotary_emb.ntk_alpha_cached == ntk_alpha(ids.shape[1], 8)
    assert not torch.allclose(base, with_ntk)
    # logn changes nothing up to the trained length, everything after it.
    torch.testing.assert_close(with_logn[:, :8], base[:, :8])
    assert (with_logn[:, 8:] - base[:, 8:]).abs().amax(-1).min() > 0
    # In training mode neither applies (alpha stays at its cached value: here 1).
    fresh = small_model(config, seq_length=8, use_dynamic_ntk=True, use_logn_attn=True).train()
    with torch.no_grad():
        trained = fresh(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(trained, base)


def test_decode_keeps_the_prefill_alpha(config, tokenizer):
    """KV-cache decoding past the trained length equals recomputing with the prefill's alpha."""
    model = small_model(config, seq_length=8)
    ids = torch.tensor([tokenizer.encode("one two three four five six seven eight nine ten eleven twelve")])[:, :30]
    assert ids.shape[1] == 30  # prompt (27) and whole (30) both in (16, 32]: the same alpha, 7
    prompt, rest = ids[:, :-3], ids[:, -3:]
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        alpha = model.transformer.rotary_emb.ntk_alpha_cached
        steps = [model(input_ids=rest[:, i : i + 1], cache=out.cache).logits for i in range(3)]
        assert model.transformer.rotary_emb.ntk_alpha_cached == alpha
        # The full sequence prefilled at once gets its own alpha; with the same alpha it matches.
        assert ntk_alpha(ids.shape[1], 8) == alpha
        full = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(steps, 1), full[:, -3:], atol=1e-5, rtol=0)


# --- images ----------------------------------------------------------------------------------------


def test_picture_positions_take_the_image_vectors(model, tokenizer):
    ids, _, pixels, encoded = picture_sample(tokenizer, pictures=2)
    seen = {}
    hook = model.transformer.h[0].register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels, use_cache=False)
            vectors = model.transformer.visual(pixels)
            embeddings = model.transformer.wte(ids)
    finally:
        hook.remove()
    hidden = seen["x"][0]
    for picture, start in enumerate(encoded.image_starts):
        assert ids[0, start] == tokenizer.img_start_id and ids[0, start + 257] == tokenizer.img_end_id
        torch.testing.assert_close(hidden[start + 1 : start + 257], vectors[picture])
        torch.testing.assert_close(hidden[start], embeddings[0, start])  # <img> keeps its embedding
        torch.testing.assert_close(hidden[start + 257], embeddings[0, start + 257])  # and </img>
    text = torch.ones(ids.shape[1], dtype=torch.bool)
    for start in encoded.image_starts:
        text[start + 1 : start + 257] = False
    torch.testing.assert_close(hidden[text], embeddings[0][text])


def test_image_count_mismatch_is_a_clear_error(model, tokenizer):
    ids, _, pixels, _ = picture_sample(tokenizer, pictures=2)
    with pytest.raises(ValueError, match="2 <img> tokens but pixel_values has 1"):
        model(input_ids=ids, pixel_values=pixels[:1], use_cache=False)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids, use_cache=False)
    with pytest.raises(ValueError, match="followed by 256 positions"):
        model(input_ids=ids[:, :100], pixel_values=pixels[:1], use_cache=False)


def test_text_only_training_batch_gives_the_vision_tower_zero_gradients(config, tokenizer):
    model = small_model(config).train()
    encoded = ChatTemplate(tokenizer).encode([("user", "Hi"), ("assistant", "Hello there")])
    out = model(input_ids=torch.tensor([encoded.input_ids]), labels=torch.tensor([encoded.labels]))
    out.loss.backward()
    visual = [p for p in model.transformer.visual.parameters() if p.requires_grad]
    assert visual and all(p.grad is not None for p in visual)
    assert all(torch.count_nonzero(p.grad) == 0 for p in visual)
    assert model.transformer.wte.weight.grad.abs().sum() > 0


# --- loss, cache, padding --------------------------------------------------------------------------


def test_loss_is_the_shifted_mean_over_supervised_labels(model, tokenizer):
    ids, labels, pixels, _ = picture_sample(tokenizer)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False)
    logits, targets = out.logits[0, :-1], labels[0, 1:]
    keep = targets != IGNORE_INDEX
    manual = -torch.log_softmax(logits[keep], -1).gather(1, targets[keep, None]).mean()
    torch.testing.assert_close(out.loss, manual)
    assert causal_lm_loss(out.logits, labels).item() == pytest.approx(out.loss.item())


def test_kv_cache_decoding_equals_full_recompute(model, tokenizer):
    ids, _, pixels, _ = picture_sample(tokenizer)
    cut = ids.shape[1] - 6
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
        first = model(input_ids=ids[:, :cut], pixel_values=pixels, use_cache=True)
        cache = first.cache
        chunk = model(input_ids=ids[:, cut : cut + 2], cache=cache).logits  # a 2-token chunk
        singles = [model(input_ids=ids[:, i : i + 1], cache=cache).logits for i in range(cut + 2, ids.shape[1])]
    incremental = torch.cat([first.logits, chunk, *singles], 1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_right_padded_batch_equals_unbatched_runs(model, tokenizer):
    short = ChatTemplate(tokenizer).encode([("user", "Hi"), ("assistant", "Hello")]).input_ids
    ids, _, pixels, _ = picture_sample(tokenizer)
    long = ids[0].tolist()
    width = len(long) + 5
    batch = torch.full((2, width), tokenizer.eod_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    batch[0, : len(short)], mask[0, : len(short)] = torch.tensor(short), 1
    batch[1, : len(long)], mask[1, : len(long)] = torch.tensor(long), 1
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask, pixel_values=pixels, use_cache=False).logits
        alone_short = model(input_ids=torch.tensor([short]), use_cache=False).logits
        alone_long = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    torch.testing.assert_close(together[0, : len(short)], alone_short[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1, : len(long)], alone_long[0], atol=1e-5, rtol=0)


def test_training_scores_only_labelled_positions_with_the_same_loss_and_gradients(config, tokenizer):
    """In training the lm_head runs on the labelled positions only; loss and gradients equal the loss over
    the full logits (dropout is 0 in the tiny config, so train and eval forward passes agree)."""
    ids, labels, pixels, _ = picture_sample(tokenizer)
    model = small_model(config).train()
    lm_head_rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: lm_head_rows.append(args[0].shape[:-1].numel()))
    fast = model(input_ids=ids, labels=labels, pixel_values=pixels)
    assert fast.logits is None and lm_head_rows == [int((labels[0, 1:] != IGNORE_INDEX).sum())]
    fast.loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full_logits = model(input_ids=ids, pixel_values=pixels).logits
    reference = torch.nn.functional.cross_entropy(full_logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(fast.loss, reference, atol=1e-6, rtol=1e-6)
    reference.backward()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-5, msg=name)


def _scored_run(config, ids, labels, pixels, budget, freeze_lm_head=True, **extra):
    """(loss, gradients, lm_head rows per forward call, rows per backward recomputation)."""
    model = small_model(config).train()
    model.lm_head.requires_grad_(not freeze_lm_head)
    model.loss_chunk_elements = budget
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    loss = model(input_ids=ids, labels=labels, pixel_values=pixels, **extra).loss
    forward_rows = list(rows)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, forward_rows, rows[len(forward_rows) :]


@pytest.mark.parametrize("num_items", [None, 40])
def test_a_long_answer_is_scored_in_chunks_with_the_same_loss_and_gradients(config, tokenizer, num_items):
    """With a frozen lm_head (LoRA on a chat model, Q-LoRA) and a chunk budget of 3 rows of the vocabulary,
    the lm_head never sees more than 3 rows at once, in the forward pass or in the backward pass's
    recomputation, and the loss and every gradient equal the one-piece computation."""
    answer = " ".join(["The red square sits left of a small blue circle."] * 3)
    ids, labels, pixels, _ = picture_sample(tokenizer, answer=answer)
    scored = int((labels[0, 1:] != IGNORE_INDEX).sum())
    assert scored > 20
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    whole_loss, whole_grads, whole_rows, whole_recomputed = _scored_run(config, ids, labels, pixels, 10**9, **extra)
    loss, grads, forward_rows, recomputed = _scored_run(config, ids, labels, pixels, 3 * config.vocab_size, **extra)
    assert whole_rows == [scored] and whole_recomputed == []
    assert sum(forward_rows) == scored and max(forward_rows) == 3 and len(forward_rows) == -(-scored // 3)
    assert sorted(recomputed) == sorted(forward_rows)  # the backward pass recomputes each chunk once
    torch.testing.assert_close(loss, whole_loss, atol=1e-6, rtol=1e-6)
    if num_items is not None:  # the summed cross-entropy over `num_items_in_batch`, not the mean
        mean = _scored_run(config, ids, labels, pixels, 10**9)[0]
        torch.testing.assert_close(loss * num_items, mean * scored, atol=1e-4, rtol=1e-5)
    assert grads.keys() == whole_grads.keys() and "lm_head.weight" not in grads and "transformer.wte.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_trainable_lm_head_is_scored_whole(config, tokenizer):
    """Chunks would make autograd hold the lm_head's weight gradient once per chunk: a trainable lm_head
    (full fine-tuning, LoRA on a base model) is scored in one piece whatever the budget."""
    answer = " ".join(["The red square sits left of a small blue circle."] * 3)
    ids, labels, pixels, _ = picture_sample(tokenizer, answer=answer)
    scored = int((labels[0, 1:] != IGNORE_INDEX).sum())
    _, grads, forward_rows, recomputed = _scored_run(
        config, ids, labels, pixels, 3 * config.vocab_size, freeze_lm_head=False
    )
    assert forward_rows == [scored] and recomputed == [] and "lm_head.weight" in grads


def test_a_packed_row_equals_its_samples_run_alone(model, tokenizer):
    """Two samples end to end in one row (positions restarting, the mask numbering them 1 and 2) give each
    sample the logits and the loss it has alone; a second row holds a single, padded sample."""
    first, first_labels, first_pixels, _ = picture_sample(tokenizer, "What colour is it?", "Blue.", pictures=2)
    second, second_labels, second_pixels, _ = picture_sample(tokenizer, "How many?", "Two.", pictures=1)
    a, b = first.shape[1], second.shape[1]
    width = a + b + 3
    ids = torch.full((2, width), tokenizer.eod_id)
    labels = torch.full((2, width), IGNORE_INDEX)
    positions = torch.zeros((2, width), dtype=torch.long)
    segments = torch.zeros((2, width), dtype=torch.long)
    ids[0, :a], ids[0, a : a + b] = first[0], second[0]
    labels[0, :a], labels[0, a : a + b] = first_labels[0], second_labels[0]
    positions[0, :a], positions[0, a : a + b] = torch.arange(a), torch.arange(b)
    segments[0, :a], segments[0, a : a + b] = 1, 2
    labels[0, a] = IGNORE_INDEX  # a sample's first token is never predicted (as packed rows are built)
    ids[1, :b], labels[1, :b], positions[1, :b], segments[1, :b] = second[0], second_labels[0], torch.arange(b), 1
    pixels = torch.cat([first_pixels, second_pixels, second_pixels])
    with torch.no_grad():
        packed = model(
            input_ids=ids, attention_mask=segments, position_ids=positions, pixel_values=pixels, labels=labels,
            use_cache=False,
        )  # fmt: skip
        alone_first = model(input_ids=first, pixel_values=first_pixels, labels=first_labels, use_cache=False)
        alone_second = model(input_ids=second, pixel_values=second_pixels, labels=second_labels, use_cache=False)
    torch.testing.assert_close(packed.logits[0, :a], alone_first.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.logits[0, a : a + b], alone_second.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.logits[1, :b], alone_second.logits[0], atol=1e-5, rtol=0)
    # the loss is the mean over every supervised token of the batch, whichever row holds it
    n1, n2 = int((first_labels[0, 1:] != IGNORE_INDEX).sum()), int((second_labels[0, 1:] != IGNORE_INDEX).sum())
    expected = (alone_first.loss * n1 + 2 * alone_second.loss * n2) / (n1 + 2 * n2)
    torch.testing.assert_close(packed.loss, expected, atol=1e-5, rtol=0)
    # without the sample numbers the second sample would see the first: the logits differ
    with torch.no_grad():
        leaky = model(input_ids=ids[:1], position_ids=positions[:1], pixel_values=pixels[:3], use_cache=False)
    assert (leaky.logits[0, a : a + b] - alone_second.logits[0]).abs().max() > 1e-3


def test_left_padding_gives_no_nan(model, tokenizer):
    ids = torch.tensor([[tokenizer.eod_id] * 4 + tokenizer.encode("Hello there")])
    mask = torch.tensor([[0] * 4 + [1] * (ids.shape[1] - 4)])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant (qwenvl train's)"])
def test_gradient_checkpointing_gives_the_same_gradients(config, tokenizer, reentrant):
    ids, labels, pixels, _ = picture_sample(tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = small_model(config).train()
        calls = []
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            inner = model.transformer._gradient_checkpointing_func
            model.transformer._gradient_checkpointing_func = lambda *a, _calls=calls, _inner=inner, **k: (
                _calls.append(1) or _inner(*a, **k)
            )
        model(input_ids=ids, labels=labels, pixel_values=pixels).loss.backward()
        assert len(calls) == (config.num_hidden_layers if checkpointing else 0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_on_the_official_target_names(config, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = small_model(config).train()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "attn.c_proj", "w1", "w2"])
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".base_layer")[0].split("transformer.h.")[-1] for n in trainable}
    assert {"0.attn.c_attn.lora_A.default.weight", "0.mlp.w2.lora_B.default.weight"} <= wrapped
    assert not any("mlp.c_proj" in n for n in trainable)  # w1/w2 only, as upstream
    ids, labels, pixels, _ = picture_sample(tokenizer)
    peft_model(input_ids=ids, labels=labels, pixel_values=pixels).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_official_key_names(model):
    keys = set(model.state_dict())
    for key in [
        "transformer.wte.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.mlp.w1.weight",
        "transformer.h.1.mlp.w2.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.weight",
        "transformer.visual.conv1.weight",
        "transformer.visual.positional_embedding",
        "transformer.visual.transformer.resblocks.1.attn.in_proj.weight",
        "transformer.visual.attn_pool.kv_proj.weight",
        "transformer.visual.attn_pool.attn.in_proj_weight",
        "transformer.visual.attn_pool.pos_embed",
        "transformer.visual.proj",
        "lm_head.weight",
    ]:
        assert key in keys, key
    assert "transformer.h.0.attn.c_proj.bias" not in keys
    assert "transformer.h.0.mlp.w1.bias" not in keys
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


def test_the_upstream_path_gives_the_same_loss_and_gradients(config, tokenizer):
    """Eager attention and logits everywhere (for --recipe upstream) compute the same thing, more slowly."""
    ids, labels, pixels, _ = picture_sample(tokenizer)
    results = []
    for upstream in (False, True):
        model = small_model(config).train()
        model.use_upstream_path(upstream)
        out = model(input_ids=ids, labels=labels, pixel_values=pixels)
        assert (out.logits is not None) == upstream
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5, msg=name)
    padded = small_model(config).eval()
    padded.use_upstream_path()
    width = ids.shape[1] + 8
    batch = torch.cat([ids, torch.full((1, 8), tokenizer.eod_id)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        eager = padded(input_ids=batch, attention_mask=mask, pixel_values=pixels, use_cache=False).logits
        plain = small_model(config).eval()(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    assert eager.shape[1] == width
    torch.testing.assert_close(eager[:, : ids.shape[1]], plain, atol=1e-5, rtol=0)


def test_attention_mask_4d_cases_and_one_host_read():
    """The 4-D mask: None where plain causal attention does, padded keys hidden (a query with no key left sees
    itself), packed rows attend within their own sample; deciding which takes one read on the host (a GPU
    sync), not one per question."""
    from qwenvl_cli.model.modeling import attention_mask_4d
    from qwenvl_cli.step_trace import SyncCensus

    def reads(*args):
        census = SyncCensus(cuda_only=False)
        census.start()
        try:
            mask = attention_mask_4d(*args, torch.device("cpu"))
        finally:
            census.stop()
        return mask, sum(site.calls for site in census.sites())

    mask, syncs = reads(torch.ones(2, 4, dtype=torch.long), 2, 4, 0)
    assert mask is None and syncs == 1
    mask, syncs = reads(torch.ones(1, 1, dtype=torch.long), 1, 1, 3)  # one new token after a cache of 3
    assert mask is None and syncs == 1
    mask, _ = reads(torch.tensor([[0, 1, 1]]), 1, 3, 0)  # left padding
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    mask, _ = reads(torch.tensor([[1, 1, 2, 2, 0]]), 1, 5, 0)  # two packed samples and a pad
    assert mask[0, 0, :4].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0]]
    mask, _ = reads(torch.tensor([[0, 1, 1, 1]]), 1, 2, 2)  # padded prompt, then two tokens with a cache
    assert mask[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]
