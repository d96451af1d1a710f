"""transformers' `generate()` on the native model gives the tokens of qwenvl's own loop past `seq_length`.

Past the trained length the official model changes its attention: dynamic NTK (the rotary base grows with the
prompt's length, chosen at the prefill and kept by the decode steps) and logn scaling of the queries. The own
loop (`qwenvl_cli.model.generation.generate`) is the reference; `GenerationMixin.generate` passes
`position_ids` (and, with padding, an attention mask) that the model must read the same way. The model here
has `seq_length` 16 and prompts of 27 and 37 tokens (NTK factors 3 and 7), and its attention projections are
scaled up (×3) so that logn's scaling of the queries moves the argmax of a random tiny model.
"""

from __future__ import annotations

import pytest
import torch

from qwenvl_cli.model.generation import GenerationSettings, generate
from qwenvl_cli.model.modeling import logn_scale, ntk_alpha
from qwenvl_cli.model.presets import build_model, preset_config, tiny_ranks
from qwenvl_cli.model.template import ChatTemplate
from qwenvl_cli.model.tokenizer import QwenVLTokenizer

SEQ_LENGTH = 16
NEW_TOKENS = 20
TEXT = (
    "The sun was setting behind the mountains when the train arrived at the small station. Children were "
    "playing football on the grass while their parents talked near the fountain. A woman carried a basket"
)


@pytest.fixture(scope="module")
def tokenizer() -> QwenVLTokenizer:
    return QwenVLTokenizer(tiny_ranks(), "tiny")


def long_context_model(tokenizer, **changes):
    config = preset_config("tiny", tokenizer.num_ranks)
    config.seq_length = SEQ_LENGTH
    for name, value in changes.items():
        setattr(config, name, value)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(3.0)  # sharper attention: logn's query scaling then changes answers
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return long_context_model(tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    long, short = tokenizer.encode(TEXT), tokenizer.encode(TEXT[:140])
    assert (len(long), len(short)) == (37, 27)
    assert ntk_alpha(len(long), SEQ_LENGTH) == 7 and ntk_alpha(len(short), SEQ_LENGTH) == 3
    return [long, short]


def own_loop(model, ids: list[int], pixel_values=None) -> list[int]:
    return generate(model, torch.tensor([ids]), pixel_values, GenerationSettings(max_new_tokens=NEW_TOKENS))


def greedy(model, input_ids, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(input_ids, do_sample=False, max_new_tokens=NEW_TOKENS, **kwargs)
    return out[:, input_ids.shape[1] :].tolist()


def test_the_prompts_reach_past_seq_length_where_ntk_and_logn_change_the_answer(tokenizer, model, prompts):
    """The comparisons below are only worth something if both mechanisms change the greedy tokens."""
    reference = [own_loop(model, ids) for ids in prompts]
    without_ntk = long_context_model(tokenizer, use_dynamic_ntk=False)
    without_logn = long_context_model(tokenizer, use_logn_attn=False)
    for ids, expected in zip(prompts, reference, strict=True):
        assert len(expected) == NEW_TOKENS
        assert own_loop(without_ntk, ids) != expected
        assert own_loop(without_logn, ids) != expected


@pytest.mark.parametrize("with_mask", [False, True], ids=["no attention mask", "all-ones attention mask"])
def test_generate_equals_the_own_loop_for_one_prompt(model, prompts, with_mask):
    ids = prompts[0]
    input_ids = torch.tensor([ids])
    kwargs = {"attention_mask": torch.ones_like(input_ids)} if with_mask else {}
    assert greedy(model, input_ids, **kwargs) == [own_loop(model, ids)]


def test_generate_with_a_picture_equals_the_own_loop(tokenizer, model):
    encoded = ChatTemplate(tokenizer).encode_raw("Picture 1: <img>p.png</img>\nThe sun was setting behind the")
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([encoded.input_ids])
    assert greedy(model, input_ids, pixel_values=pixels) == [own_loop(model, encoded.input_ids, pixels)]


def test_a_left_padded_batch_generates_each_prompt_as_alone(tokenizer, model, prompts):
    """Each row gets its own prompt's NTK factor and logn scales, as if it were generated alone; the padding
    (5 fewer tokens would give the short prompt the long one's factor, 7) changes nothing."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[tokenizer.eod_id] * (width - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    together = greedy(model, input_ids, attention_mask=mask, pad_token_id=tokenizer.eod_id)
    assert together == [own_loop(model, ids) for ids in prompts]


def test_logn_scale_per_row():
    positions = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    scale = logn_scale(positions, 8)
    assert scale.shape == positions.shape
    for row in range(2):
        torch.testing.assert_close(scale[row], logn_scale(positions[row], 8))
    assert logn_scale(positions[:, :8], 8) is None  # no position past the trained length
