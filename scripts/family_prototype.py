"""Prototype: tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL through transformers' own classes, fully offline.

For each family (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe): build a tiny config, a model
(AutoModelForImageTextToText.from_config), an offline processor (Qwen2VLImageProcessorPil with small min/max
pixels + a Qwen2Tokenizer over a BPE trained here + a chat template written here, in an image-only subclass of the
family's processor because the official one cannot be built without torchvision), save both, reload them
(AutoModelForImageTextToText.from_pretrained; AutoProcessor is tried first and its failure recorded), then
forward, backward on assistant-only labels and a 5-token generate (each timed 5 times), plus probes: LoRA target
matching, hub-style processor files, legacy min/max_pixels kwargs, the mm_token_type_ids requirement.

Run:  HF_HUB_OFFLINE=1 python scripts/family_prototype.py [family ...]
      (writes /tmp/qwenvl-family-prototype, or $FAMILY_PROTOTYPE_OUT)
      (TINY_THREADS=2 for two torch threads; TINY_TOKENIZER=generic for the PreTrainedTokenizerFast variant)
Research code, not product code.  Every API obstacle met is noted in OBSTACLES and printed at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("TINY_THREADS", "1")))  # 1: be gentle on a shared 2-core box

OUT = Path(os.environ.get("FAMILY_PROTOTYPE_OUT", "/tmp/qwenvl-family-prototype"))
OBSTACLES: list[str] = []

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary: a small BPE (Qwen2 pre-tokenizer) plus the Qwen2 special tokens, in the official order.
# Official ids start at 151643 (<|endoftext|>); here they start at BASE, so official_id - 151643 + BASE.
# ---------------------------------------------------------------------------------------------------------------
BPE_SIZE = 480  # learned vocabulary (256 byte symbols + merges)
BASE = BPE_SIZE  # first special id
QWEN2_SPECIALS = [  # official id = 151643 + index
    "<|endoftext|>",  # 151643
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645
    "<|object_ref_start|>",  # 151646
    "<|object_ref_end|>",  # 151647
    "<|box_start|>",  # 151648
    "<|box_end|>",  # 151649
    "<|quad_start|>",  # 151650
    "<|quad_end|>",  # 151651
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",  # 151654
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
]
SPECIAL_ID = {tok: BASE + i for i, tok in enumerate(QWEN2_SPECIALS)}
VOCAB_SIZE = 512  # model embedding rows (>= BASE + len(QWEN2_SPECIALS)), well under 2k

CORPUS = [
    "You are a helpful assistant.",
    "Describe this picture. What is in the image? A red square on a grey field.",
    "Locate the cat and output the bbox coordinates in JSON format.",
    '{"bbox_2d": [120, 233, 560, 780], "label": "cat"} (120,233),(560,780)',
    "system user assistant picture video label the a an of in on with and 0123456789",
    "The quick brown fox jumps over the lazy dog. Picture 1: Video 1:",
]

# ---------------------------------------------------------------------------------------------------------------
# Chat templates written for this prototype.  They reproduce the token layout of the official templates
# (Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct chat_template.json; Qwen3-VL-8B-Instruct chat_template.json)
# for plain user/assistant/system turns with images and text; tools, video and thinking are left out.
# The assistant text is wrapped in {% generation %} so return_assistant_tokens_mask can be tried.
# ---------------------------------------------------------------------------------------------------------------
_CONTENT = (  # renders one message's content; every newline sits inside a {{ '...' }} string so that the
    # whitespace-control dashes ({%- ... -%}) cannot eat it
    "{%- if m.content is string -%}"
    "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif -%}"  # noqa: E501
    "{%- else -%}{%- for c in m.content -%}"
    "{%- if c.type == 'image' or 'image' in c or 'image_url' in c -%}"
    "{%- set ns.img = ns.img + 1 -%}{%- if add_vision_id %}{{ 'Picture ' ~ ns.img ~ ': ' }}{% endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c.type == 'video' or 'video' in c -%}"
    "{%- set ns.vid = ns.vid + 1 -%}{%- if add_vision_id %}{{ 'Video ' ~ ns.vid ~ ': ' }}{% endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in c -%}"
    "{%- if m.role == 'assistant' %}{% generation %}{{ c.text }}{% endgeneration %}{% else %}{{ c.text }}{% endif -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
)
# Qwen2-VL and Qwen2.5-VL: a default system turn when the first message is not a system message.
TEMPLATE_QWEN2 = (
    "{%- set ns = namespace(img=0, vid=0) -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m.role != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + m.role + '\\n' }}" + _CONTENT + "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
# Qwen3-VL (Instruct): no default system turn.
TEMPLATE_QWEN3 = (
    "{%- set ns = namespace(img=0, vid=0) -%}"
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m.role + '\\n' }}" + _CONTENT + "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


def image_only(base: type) -> type:
    """A subclass of a Qwen*VLProcessor without the video sub-processor.

    Without torchvision, transformers 5.25 cannot construct Qwen2VLProcessor / Qwen2_5_VLProcessor /
    Qwen3VLProcessor at all: ProcessorMixin checks each sub-processor against `transformers.VideoProcessorMixin`,
    which is only exported when torchvision imports (AttributeError ... VIDEO_PROCESSOR_MAPPING ... _extra_content),
    and AutoVideoProcessor is itself gated on torchvision.  ProcessorMixin derives the sub-processor list from the
    __init__ signature, so an __init__ without `video_processor` gives an image+text processor that keeps every
    other method of the family's processor (token expansion, mm_token_type_ids, chat template handling).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return type(f"ImageOnly{base.__name__}", (base,), {"__init__": __init__})


def build_tokenizer(chat_template: str):
    """A real transformers.Qwen2Tokenizer over a tiny BPE trained here, special ids pinned at BASE.. .

    First attempt (kept as the fallback, TINY_TOKENIZER=generic): a plain byte-level `tokenizers` BPE wrapped in
    PreTrainedTokenizerFast (an alias of TokenizersBackend in 5.x).  It works, but its tokenizer_config says
    TokenizersBackend, and if the folder is labelled Qwen2Tokenizer (as the official checkpoints are) 5.25
    rebuilds the pre-tokenizer (Qwen2 regex, one digit per token, NFC) and the ids change.  So the BPE is
    trained here with Qwen2Tokenizer's own normalizer and pre-tokenizer and handed to Qwen2Tokenizer(vocab, merges).
    """
    import transformers as tf

    generic = os.environ.get("TINY_TOKENIZER") == "generic"
    tok = Tokenizer(models.BPE())
    if generic:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        ref = tf.Qwen2Tokenizer()  # default instance: only its normalizer / pre-tokenizer are used
        tok.normalizer = ref.backend_tokenizer.normalizer
        tok.pre_tokenizer = ref.backend_tokenizer.pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    n = tok.get_vocab_size()
    if n != BPE_SIZE:
        OBSTACLES.append(f"BPE trainer produced {n} symbols for vocab_size={BPE_SIZE}; padded with unused tokens")
    if generic:
        tok.add_tokens([f"<|unused_{i}|>" for i in range(BPE_SIZE - n)])
        tok.add_special_tokens(QWEN2_SPECIALS)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        model = json.loads(tok.to_str())["model"]
        vocab = dict(model["vocab"])
        for i in range(len(vocab), BPE_SIZE):
            vocab[f"<|unused_{i}|>"] = i
        vocab.update(SPECIAL_ID)  # pin the special ids
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        fast = tf.Qwen2Tokenizer(
            vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
        )
        fast.add_special_tokens({"additional_special_tokens": QWEN2_SPECIALS})
    for t, i in SPECIAL_ID.items():
        assert fast.convert_tokens_to_ids(t) == i, (t, fast.convert_tokens_to_ids(t), i)
    fast.chat_template = chat_template
    return fast


# ---------------------------------------------------------------------------------------------------------------
# Tiny configs.  Text: hidden 64, 2 layers, 4 heads (head_dim 16 -> mrope_section sums to 8), vocab 512.
# ---------------------------------------------------------------------------------------------------------------
def text_common(**extra):
    d = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=SPECIAL_ID["<|endoftext|>"],
        eos_token_id=SPECIAL_ID["<|im_end|>"],
        pad_token_id=SPECIAL_ID["<|endoftext|>"],
    )
    d.update(extra)
    return d


def token_ids():
    return dict(
        image_token_id=SPECIAL_ID["<|image_pad|>"],
        video_token_id=SPECIAL_ID["<|video_pad|>"],
        vision_start_token_id=SPECIAL_ID["<|vision_start|>"],
        vision_end_token_id=SPECIAL_ID["<|vision_end|>"],
    )


def tiny_config(family: str):
    if family == "qwen2_vl":
        text = text_common(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
        )
    elif family == "qwen2_5_vl":
        text = text_common(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    elif family == "qwen3_vl":
        text = text_common(
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            temporal_patch_size=2,
            spatial_merge_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
    elif family == "qwen3_vl_moe":  # the MoE variant: same processor and vision tower, MoE text layers
        text = text_common(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            temporal_patch_size=2,
            spatial_merge_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
    else:
        raise ValueError(family)
    return AutoConfig.for_model(family, text_config=text, vision_config=vision, **token_ids())


FAMILY_PIXELS = {  # (patch, factor) and small min/max pixel budgets for the prototype
    "qwen2_vl": dict(
        patch_size=14,
        merge_size=2,
        min_pixels=4 * 28 * 28,
        max_pixels=16 * 28 * 28,
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
    ),
    "qwen2_5_vl": dict(
        patch_size=14,
        merge_size=2,
        min_pixels=4 * 28 * 28,
        max_pixels=16 * 28 * 28,
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
    ),
    "qwen3_vl": dict(
        patch_size=16,
        merge_size=2,
        min_pixels=4 * 32 * 32,
        max_pixels=16 * 32 * 32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}
FAMILY_PIXELS["qwen3_vl_moe"] = FAMILY_PIXELS["qwen3_vl"]
OFFICIAL_PROCESSOR = {
    "qwen2_vl": transformers.Qwen2VLProcessor,
    "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
    "qwen3_vl": transformers.Qwen3VLProcessor,
    "qwen3_vl_moe": transformers.Qwen3VLProcessor,  # processing_auto maps qwen3_vl_moe -> Qwen3VLProcessor
}
PROCESSOR_CLASS = {fam: image_only(cls) for fam, cls in OFFICIAL_PROCESSOR.items()}


def build_processor(family: str):
    p = FAMILY_PIXELS[family]
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": p["min_pixels"], "longest_edge": p["max_pixels"]},
        patch_size=p["patch_size"],
        temporal_patch_size=2,
        merge_size=p["merge_size"],
        image_mean=list(p["mean"]),
        image_std=list(p["std"]),
    )
    template = TEMPLATE_QWEN3 if family.startswith("qwen3") else TEMPLATE_QWEN2
    tokenizer = build_tokenizer(template)
    cls = PROCESSOR_CLASS[family]
    try:  # the official class first, to record the obstacle
        OFFICIAL_PROCESSOR[family](
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=template
        )
    except Exception as e:
        OBSTACLES.append(
            f"[{family}] {OFFICIAL_PROCESSOR[family].__name__}(..., video_processor=None) failed: "
            f"{type(e).__name__}: {str(e)[:200]}"
        )
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def load_processor(path: Path, family: str):
    """AutoProcessor first; on failure note it and assemble the processor from its parts."""
    try:
        auto = AutoProcessor.from_pretrained(path)
        if isinstance(auto, transformers.ProcessorMixin):
            return auto, "AutoProcessor.from_pretrained"
        OBSTACLES.append(f"[{family}] AutoProcessor.from_pretrained returned a {type(auto).__name__}, not a processor")
    except Exception as e:
        OBSTACLES.append(f"[{family}] AutoProcessor.from_pretrained failed: {type(e).__name__}: {str(e)[:300]}")
    cls = PROCESSOR_CLASS[family]
    return cls.from_pretrained(path), f"{cls.__name__}.from_pretrained (image-only subclass)"


def assistant_only_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Assistant-only labels as QwenLM qwen-vl-finetune (qwenvl/data/data_processor.py) builds them: after each
    '<|im_start|>assistant\\n' header, supervise the content, the closing <|im_end|> and the token after it
    ('\\n'); -100 everywhere else (system, user, pictures, role headers).  The official code matches the single
    token 'assistant' (id 77091); our tiny BPE may split the word, so the header is found by decoding."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = input_ids.tolist()
    labels = [-100] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] == im_start:
            j = i + 1  # grow the header until it decodes to 'assistant\n' (or clearly is not)
            while j < len(ids) and ids[j] != im_end and len(tokenizer.decode(ids[i + 1 : j + 1])) < len("assistant\n"):
                j += 1
            if tokenizer.decode(ids[i + 1 : j + 1]) == "assistant\n":
                k = j + 1
                while k < len(ids) and ids[k] != im_end:
                    k += 1
                for t in range(j + 1, min(k + 2, len(ids))):  # content + <|im_end|> + '\n'
                    labels[t] = ids[t]
                i = k
        i += 1
    return torch.tensor(labels, dtype=input_ids.dtype)


def answer_text(family: str, w: int, h: int, rw: int, rh: int) -> str:
    """One box (a quarter of the picture, top-left) written in each family's grounding convention."""
    x1, y1, x2, y2 = 0.0, 0.0, w / 2, h / 2
    if family == "qwen2_vl":
        n = [round(x1 / w * 1000), round(y1 / h * 1000), round(x2 / w * 1000), round(y2 / h * 1000)]
        return (
            f"<|object_ref_start|>the square<|object_ref_end|><|box_start|>({n[0]},{n[1]}),({n[2]},{n[3]})<|box_end|>"
        )
    if family.startswith("qwen2_5"):  # absolute pixels of the smart-resized picture
        b = [round(x1 * rw / w), round(y1 * rh / h), round(x2 * rw / w), round(y2 * rh / h)]
    else:  # qwen3_vl: relative 0-1000
        b = [round(x1 / w * 1000), round(y1 / h * 1000), round(x2 / w * 1000), round(y2 / h * 1000)]
    return json.dumps([{"bbox_2d": b, "label": "the square"}])


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_family(family: str) -> dict:
    res: dict = {"family": family}
    out = OUT / family
    t0 = time.perf_counter()
    config = tiny_config(family)
    res["config_class"] = type(config).__name__
    model = AutoModelForImageTextToText.from_config(config)
    res["model_class"] = type(model).__name__
    res["t_build_model_s"] = round(time.perf_counter() - t0, 3)
    processor = build_processor(family)
    res["processor_class"] = type(processor).__name__

    t0 = time.perf_counter()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Write the official processor class name, so that the folder loads with AutoProcessor where torchvision
    # is installed (the image-only subclass is only a local stand-in).
    for f in ("processor_config.json", "tokenizer_config.json"):
        pc = out / f
        pc.write_text(pc.read_text().replace(type(processor).__name__, OFFICIAL_PROCESSOR[family].__name__))
    res["saved_files"] = sorted(p.name for p in out.iterdir())
    res["t_save_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    processor, how = load_processor(out, family)
    res["processor_reload"] = how
    model = AutoModelForImageTextToText.from_pretrained(out)
    res["t_reload_s"] = round(time.perf_counter() - t0, 3)
    res["reloaded_model_class"] = type(model).__name__
    res["tokenizer_class_after_reload"] = type(processor.tokenizer).__name__
    res["image_processor_class_after_reload"] = type(processor.image_processor).__name__
    res["saved_weight_prefixes"] = saved_prefixes(out)

    # --- inputs: one 56x84 (W x H) picture, one user turn, one assistant turn -------------------------------
    w, h = 56, 84
    img = Image.new("RGB", (w, h), (128, 128, 128))
    img.paste((200, 30, 30), (0, 0, w // 2, h // 2))
    ip = processor.image_processor
    patch, merge = ip.patch_size, ip.merge_size
    rh, rw = smart_resize(
        h, w, factor=patch * merge, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"]
    )
    expected_tokens = (rh // patch) * (rw // patch) // merge**2
    res["picture"] = {
        "W x H": f"{w}x{h}",
        "smart_resize W x H": f"{rw}x{rh}",
        "factor": patch * merge,
        "expected_picture_tokens": expected_tokens,
    }
    messages = [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Locate the square."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer_text(family, w, h, rw, rh)}]},
    ]
    res["rendered_prompt"] = processor.apply_chat_template(messages, tokenize=False)
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    res["batch_keys"] = {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
    ids = batch["input_ids"][0]
    n_pad = int((ids == processor.image_token_id).sum())
    res["picture_tokens_in_input"] = n_pad
    res["image_grid_thw"] = batch["image_grid_thw"].tolist()
    try:
        mm = processor._get_num_multimodal_tokens(image_sizes=[[h, w]])
        res["processor_num_image_tokens"] = mm.num_image_tokens
    except Exception as e:
        OBSTACLES.append(f"[{family}] _get_num_multimodal_tokens: {type(e).__name__}: {e}")
    assert n_pad == expected_tokens, (n_pad, expected_tokens)

    labels = assistant_only_labels(ids, processor.tokenizer)
    sup = labels != -100
    res["supervised_text"] = processor.tokenizer.decode(ids[sup])
    if "assistant_masks" in batch:
        am = batch["assistant_masks"][0].bool()
        res["assistant_masks_text"] = processor.tokenizer.decode(ids[am])
    else:
        OBSTACLES.append(f"[{family}] return_assistant_tokens_mask gave no assistant_masks")
    inputs = {k: v for k, v in batch.items() if k != "assistant_masks"}

    # --- forward, backward, generate ---------------------------------------------------------------------------
    def timed(fn, n=5):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = fn()
            times.append(time.perf_counter() - t0)
        return r, [round(t, 4) for t in times]

    model.eval()
    with torch.no_grad():
        out_f, res["t_forward_s (5 calls)"] = timed(lambda: model(**inputs))
    res["logits_shape"] = list(out_f.logits.shape)
    try:  # mm_token_type_ids is required with pixel inputs in 5.25 (M-RoPE positions come from it)
        with torch.no_grad():
            no_tt = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
        diff = float((no_tt.logits - out_f.logits).abs().max())
        res["forward_without_mm_token_type_ids"] = (
            f"runs silently; max |logit diff| vs with it = {diff:.3g} (positions fall back to 1-D)"
        )
    except Exception as e:
        res["forward_without_mm_token_type_ids"] = f"{type(e).__name__}: {str(e)[:160]}"
    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        o = model(**inputs, labels=labels.unsqueeze(0))
        o.loss.backward()
        return o

    out_t, res["t_forward_backward_s (5 calls)"] = timed(train_step)
    res["loss"] = round(float(out_t.loss.detach()), 4)
    res["grad_nonzero"] = {
        "vision": any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.visual.parameters()),
        "lm": any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.language_model.parameters()),
    }
    model.zero_grad(set_to_none=True)
    model.eval()
    gen_in = processor.apply_chat_template(
        messages[:1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        gen, res["t_generate_5_s (5 calls)"] = timed(
            lambda: model.generate(**gen_in, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        )
    res["generated_ids"] = gen[0, gen_in["input_ids"].shape[1] :].tolist()

    # --- module facts ------------------------------------------------------------------------------------------
    res["params"] = {
        "total": count_params(model),
        "visual (model.model.visual)": count_params(model.model.visual),
        "merger (model.model.visual.merger)": count_params(model.model.visual.merger),
        "language_model (model.model.language_model)": count_params(model.model.language_model),
        "lm_head": count_params(model.lm_head),
    }
    if hasattr(model.model.visual, "deepstack_merger_list"):
        res["params"]["deepstack_merger_list"] = count_params(model.model.visual.deepstack_merger_list)
    res["has model.visual"] = hasattr(model, "visual")
    res["has model.language_model"] = hasattr(model, "language_model")
    res["linear_suffixes"] = linear_suffixes(model)
    res["lora"] = lora_probe(model)
    res["hub_layout"] = hub_layout_probe(out, family, processor)
    res["legacy_call_kwargs"] = legacy_kwargs_probe(processor, img, family)
    return res


def legacy_kwargs_probe(processor, img, family: str) -> dict:
    """Do call-time min_pixels/max_pixels still work in 5.25, and what does size={...} give?"""
    import warnings

    ip = processor.image_processor
    big = img.resize((img.width * 4, img.height * 4))
    r = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = ip(images=[big], min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"] // 2)
        r["min/max_pixels kwargs grid"] = a["image_grid_thw"].tolist()
        r["warnings"] = sorted({str(x.message)[:90] for x in w if issubclass(x.category, FutureWarning)})
    b = ip(images=[big], size={"shortest_edge": ip.size["shortest_edge"], "longest_edge": ip.size["longest_edge"] // 2})
    r["size={...} grid"] = b["image_grid_thw"].tolist()
    return r


def hub_layout_probe(out: Path, family: str, processor) -> dict:
    """Rewrite the saved processor files the way the official Hub checkpoints ship them (preprocessor_config.json
    with the legacy min_pixels/max_pixels keys for Qwen2/2.5-VL or size{} for Qwen3-VL, chat_template.json,
    tokenizer_class Qwen2Tokenizer, processor_class the official name), then load them again."""
    import shutil

    hub = out.parent / f"{family}_hublayout"
    shutil.rmtree(hub, ignore_errors=True)
    hub.mkdir(parents=True)
    for f in ("tokenizer.json", "config.json", "generation_config.json"):
        shutil.copy(out / f, hub / f)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (hub / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    ip = processor.image_processor
    pre = {
        "patch_size": ip.patch_size,
        "temporal_patch_size": 2,
        "merge_size": ip.merge_size,
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "image_processor_type": "Qwen2VLImageProcessor"
        if not family.startswith("qwen3")
        else "Qwen2VLImageProcessorFast",
        "processor_class": OFFICIAL_PROCESSOR[family].__name__,
    }
    if family.startswith("qwen3"):
        pre["size"] = {"longest_edge": 2 * ip.size["longest_edge"], "shortest_edge": ip.size["shortest_edge"]}
    else:  # Qwen2-VL-7B-Instruct style: legacy keys only
        pre["min_pixels"], pre["max_pixels"] = ip.size["shortest_edge"], 2 * ip.size["longest_edge"]
    (hub / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    r: dict = {"files": sorted(p.name for p in hub.iterdir())}
    try:
        a = AutoProcessor.from_pretrained(hub)
        r["AutoProcessor"] = type(a).__name__
    except Exception as e:
        r["AutoProcessor"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        p = PROCESSOR_CLASS[family].from_pretrained(hub)
        r["image-only subclass"] = type(p).__name__
        r["size after load"] = (
            dict(p.image_processor.size.__dict__)
            if hasattr(p.image_processor.size, "__dict__")
            else dict(p.image_processor.size)
        )
        r["tokenizer class"] = type(p.tokenizer).__name__
        text = "<|im_start|>user\nLocate the cat. (120,233),(560,780)<|im_end|>\n"
        a_ids = processor.tokenizer(text)["input_ids"]
        b_ids = p.tokenizer(text)["input_ids"]
        r["same ids as saved tokenizer"] = a_ids == b_ids
        r["chat template loaded"] = p.chat_template == processor.chat_template
    except Exception as e:
        r["image-only subclass"] = f"{type(e).__name__}: {str(e)[:300]}"
    return r


def saved_prefixes(out: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    return sorted({".".join(k.split(".")[:3]) for k in keys})


def linear_suffixes(model) -> dict[str, list[str]]:
    found: dict[str, set[str]] = {"vision": set(), "lm": set(), "other": set()}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            where = "vision" if ".visual." in f".{name}." else "lm" if "language_model" in name else "other"
            found[where].add(
                name.split(".")[-1] if not name.split(".")[-1].isdigit() else ".".join(name.split(".")[-2:])
            )
    return {k: sorted(v) for k, v in found.items()}


def lora_probe(model) -> dict:
    """Which modules does peft wrap for (a) the bare suffix list and (b) a regex restricted to the LM?"""
    import copy

    from peft import LoraConfig, get_peft_model

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = {}
    for label, targets in {
        "suffix list": names,
        "LM-only regex": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        "all-linear": "all-linear",
    }.items():
        m = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        wrapped = [
            n for n, mod in m.named_modules() if hasattr(mod, "lora_A") and isinstance(mod.lora_A, torch.nn.ModuleDict)
        ]
        out[label] = {
            "wrapped": len(wrapped),
            "in_vision": sum(".visual." in n for n in wrapped),
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
        }
    return out


def main(argv: list[str]) -> int:
    families = argv or ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    results = []
    for fam in families:
        print(f"\n===== {fam} =====")
        r = run_family(fam)
        print(json.dumps(r, indent=1, default=str))
        results.append(r)
    print("\n===== obstacles =====")
    for o in OBSTACLES:
        print("-", o)
    (OUT / "results.json").write_text(json.dumps({"results": results, "obstacles": OBSTACLES}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
