"""Native Qwen-VL language model (`QwenVLForCausalLM`), with the official state-dict names.

```
transformer.wte            token embeddings (not tied to lm_head)
transformer.h.N            pre-norm blocks: ln_1 → attn (c_attn with bias, c_proj) → ln_2 → mlp (w1, w2, c_proj)
transformer.ln_f           final RMSNorm
transformer.visual         ViT + resampler (vision.py): 256 vectors per picture
lm_head
```
Behaviour reproduced from the official model (see DESIGN.md): RMSNorm in fp32; rotary over the whole
head with `cat(freqs, freqs)`, in fp32, at positions `cache_length + 0..S-1` whatever the padding;
dynamic NTK on eval-mode prefill; logn query scaling past `seq_length` in eval mode; each picture's 256
`<img>…</img>` positions take the picture's vectors.

`position_ids`, when given, are the positions of all three (rotary, logn, and the length that picks the
NTK factor, per row). transformers' `generate()` always passes them, counted from each row's first real
token: a prompt then gets the tokens qwenvl's own loop gives it alone, left-padded in a batch or not. (The
official code ignores them: a left-padded row there takes the NTK factor of the padded length and the logn
scales of its padded positions, so its answer depends on what it is batched with.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import QwenVLConfig
from .vision import VisionTransformer

IGNORE_INDEX = -100
# Logits per chunk of the training loss: 2**25 fp32 values (128 MiB) is 220 rows of the official 151,936-row
# vocabulary. A tiny model's whole answer fits in one chunk, which is then the plain computation.
LOSS_CHUNK_ELEMENTS = 2**25


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, cast back, then scaled, as the official model does. F.rms_norm
        # without a weight is that formula (bit for bit on CPU, tested) and one fused kernel on CUDA, where the
        # written-out formula is five.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def ntk_alpha(seq_len: int, trained_len: int) -> float:
    """Dynamic-NTK factor for a prompt of `seq_len` tokens: max(2**ceil(log2(S/L) + 1) - 1, 1)."""
    return max(2 ** math.ceil(math.log(seq_len / trained_len, 2) + 1) - 1, 1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables (fp32) for rotate-half rotary embeddings over the first `dim` channels of a head."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim = dim
        self.base = base
        self.ntk_alpha_cached = 1.0  # the alpha of the last eval-mode prefill; decode steps keep it

    def inverse_frequencies(self, alpha: float, device: torch.device) -> torch.Tensor:
        base = self.base * alpha ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, device=device).float() / self.dim
        return 1.0 / (base**exponents)

    def forward(self, positions: torch.Tensor, alpha: float | tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """`alpha` is one factor, or one per row of the batch (a left-padded batch of prompts of different
        lengths, see `prefill_alpha`); per-row factors need `positions` per row, (batch, seq)."""
        if isinstance(alpha, tuple) and positions.dim() == 1:
            positions = positions.expand(len(alpha), -1)
        if isinstance(alpha, tuple) and positions.shape[0] != len(alpha):
            # Another batch than the prefill's (a training step after generation): the factor the official
            # model would have kept, the one of the longest row.
            alpha = max(alpha)
        if isinstance(alpha, tuple):
            tables = {a: self.inverse_frequencies(a, positions.device) for a in set(alpha)}
            inv_freq = torch.stack([tables[a] for a in alpha])[:, None, :]  # (batch, 1, dim/2)
        else:
            inv_freq = self.inverse_frequencies(alpha, positions.device)
        freqs = positions.float()[..., None] * inv_freq  # (seq, dim/2), or (batch, seq, dim/2) per row
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def prefill_alpha(positions: torch.Tensor, trained_len: int) -> float | tuple[float, ...]:
    """The dynamic-NTK factor of a prefill from its positions, (seq,) or (batch, seq): each row's length is
    its last position + 1, so a left-padded row (positions counted from its first real token, as
    `generate` numbers them) gets the factor of its prompt alone. One float when all rows agree."""
    lengths = (positions.reshape(-1, positions.shape[-1]).amax(dim=-1) + 1).tolist()
    alphas = tuple(float(ntk_alpha(n, trained_len)) for n in lengths)
    return alphas[0] if len(set(alphas)) == 1 else alphas


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq, rot_dim), or (batch, seq, rot_dim) for packed rows, made ready for `rotate`
    once per forward pass rather than once per layer: a heads axis added, and the sign of rotate-half folded
    into sin, so that rotate_half(x) * sin == roll(x, rot_dim / 2) * signed_sin exactly (a negation is exact)."""
    half = cos.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    if cos.dim() == 2:
        return cos[None, :, None, :], signed[None, :, None, :]
    return cos[:, :, None, :], signed[:, :, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (batch, seq, heads, head_dim) with tables from `rotary_tables`, over the first
    rot_dim channels of each head; computed in fp32, returned in x's dtype."""
    rot_dim = cos.shape[-1]
    x32 = x.float()
    if rot_dim == x.shape[-1]:  # the official models rotate the whole head
        return (x32 * cos + x32.roll(rot_dim // 2, dims=-1) * signed_sin).type_as(x)
    head, rest = x32[..., :rot_dim], x32[..., rot_dim:]
    rotated = head * cos + head.roll(rot_dim // 2, dims=-1) * signed_sin
    return torch.cat((rotated, rest), dim=-1).type_as(x)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, rot_dim), or (batch, seq, rot_dim) when every row has
    positions of its own (packed rows): x * cos + rotate_half(x) * sin on the first rot_dim channels, with
    rotate_half(x) = cat(-x2, x1). Computed in fp32, returned in x's dtype."""
    return rotate(x, *rotary_tables(cos, sin))


def logn_scale(positions: torch.Tensor, trained_len: int) -> torch.Tensor | None:
    """log(p+1)/log(L) for 0-based positions p with p+1 > L (1 elsewhere), of the shape of `positions`,
    (seq,) or (batch, seq); None when nothing is scaled."""
    if int(positions.max()) + 1 <= trained_len:
        return None
    steps = positions.double() + 1
    scale = torch.where(steps > trained_len, torch.log(steps) / math.log(trained_len), torch.ones_like(steps))
    return scale.float()


class QwenAttention(nn.Module):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        projection = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection, bias=True)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.dropout = config.attn_dropout_prob
        self.eager = False  # upstream's attention path: the score matrix materialised (see use_upstream_path)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,  # cos and the signed sin of `rotary_tables`
        logn: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads = self.num_heads
        qkv = self.c_attn(x).view(batch, seq, 3 * heads, self.head_dim)  # q's heads, then k's, then v's
        q, k = rotate(qkv[:, :, : 2 * heads], cos, sin).split(heads, dim=2)  # q and k rotated together
        v = qkv[:, :, 2 * heads :]
        if logn is not None:  # (seq,) or (batch, seq)
            q = q * (logn[None, :, None, None] if logn.dim() == 1 else logn[:, :, None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        causal = mask is None and seq > 1 and k.shape[2] == seq
        if self.eager:
            out = self._eager(q, k, v, mask, causal)
            return self.c_proj(out.transpose(1, 2).reshape(batch, seq, self.hidden_size))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.scale,
        )
        return self.c_proj(out.transpose(1, 2).reshape(batch, seq, self.hidden_size))

    def _eager(self, q, k, v, mask, causal):
        """Attention as upstream's non-flash path computes it: the (heads, S, S) scores in full, masked,
        softmax, dropout, times v. Same result as SDPA; more memory and time (kept for comparisons)."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if causal:
            seq = q.shape[2]
            mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
        probs = F.dropout(probs, self.dropout, self.training)
        return torch.matmul(probs, v)


class QwenMLP(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QwenBlock(nn.Module):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QwenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QwenMLP(config)

    def forward(self, x, cos, sin, logn, mask, cache):
        x = x + self.attn(self.ln_1(x), cos, sin, logn, mask, cache)
        return x + self.mlp(self.ln_2(x))


class QwenModel(nn.Module):
    """The `transformer` module: embeddings, blocks, final norm and the vision tower."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        rot_dim = int(config.kv_channels * config.rotary_pct)
        self.rotary_emb = RotaryEmbedding(rot_dim, config.rotary_emb_base)
        self.h = nn.ModuleList(QwenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`position_ids` (batch, seq): for packed rows whose samples each start at position 0, and for
        left-padded prompts as `generate()` numbers them (padding at 0, then 0, 1, … from the first real
        token); they place rotary and logn, and a row's last position + 1 is its length for the NTK factor
        of an eval-mode prefill. Without them positions count on from the cache, as the official model's do.
        An `attention_mask` may number the samples of a packed row (1, 2, …; 0 is padding): a token then
        sees only earlier tokens of its own sample."""
        hidden = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        default_positions = torch.arange(past, past + seq, device=hidden.device)
        positions = position_ids.to(hidden.device) if position_ids is not None else default_positions

        config = self.config
        if config.use_dynamic_ntk and past == 0 and not self.training:
            trained = config.seq_length
            alpha = ntk_alpha(seq, trained) if position_ids is None else prefill_alpha(positions, trained)
            self.rotary_emb.ntk_alpha_cached = alpha
        cos, sin = rotary_tables(*self.rotary_emb(positions, self.rotary_emb.ntk_alpha_cached))
        logn = None
        if config.use_logn_attn and not self.training:
            logn = logn_scale(positions, config.seq_length)
        mask = attention_mask_4d(attention_mask, batch, seq, past, hidden.device)

        hidden = self.drop(hidden)
        if past == 0:  # pictures are read on prefill only, as upstream does; decode steps never see them
            hidden = self._insert_images(hidden, input_ids, pixel_values)

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if checkpointing and cache is None:
                hidden = self._gradient_checkpointing_func(block.__call__, hidden, cos, sin, logn, mask, None)
            else:
                hidden = block(hidden, cos, sin, logn, mask, cache)
        return self.ln_f(hidden)

    def _insert_images(self, hidden, input_ids, pixel_values):
        start_id = self.config.image_start_id
        starts = (input_ids == start_id).nonzero() if input_ids is not None else None
        if starts is None or len(starts) == 0:
            if self.training and torch.is_grad_enabled():
                # Touch the vision tower so that its parameters get zero gradients rather than none.
                size = self.visual.image_size
                fake = torch.zeros(1, 3, size, size, device=hidden.device, dtype=self.visual.dtype)
                hidden = hidden + self.visual(fake).mean().to(hidden.dtype) * 0
            return hidden
        if pixel_values is None:
            raise ValueError(f"input_ids hold {len(starts)} <img> tokens but no pixel_values were given")
        if pixel_values.shape[0] != len(starts):
            raise ValueError(
                f"input_ids hold {len(starts)} <img> tokens but pixel_values has {pixel_values.shape[0]} images"
            )
        span = self.visual.vision_tokens
        rows, cols = starts[:, 0], starts[:, 1]
        ends = cols + span + 1
        if (ends >= input_ids.shape[1]).any() or (
            input_ids[rows, ends.clamp(max=input_ids.shape[1] - 1)] != start_id + 1
        ).any():
            raise ValueError(f"every <img> must be followed by {span} positions and </img>")
        features = self.visual(pixel_values).to(hidden.dtype)  # (n, span, hidden)
        offsets = torch.arange(1, span + 1, device=hidden.device)
        index_rows = rows[:, None].expand(-1, span).reshape(-1)
        index_cols = (cols[:, None] + offsets).reshape(-1)
        hidden = hidden.clone()
        hidden[index_rows, index_cols] = features.reshape(-1, features.shape[-1])
        return hidden


def attention_mask_4d(
    attention_mask: torch.Tensor | None, batch: int, seq: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (batch, 1, seq, past+seq) mask: causal, and padded keys hidden (and, where the mask numbers
    the samples of packed rows, other samples' keys too). None when plain causal attention does (no padding
    and no cache, or a single new token without padding)."""
    total = past + seq
    packed = full = False
    if attention_mask is not None:
        # both questions in one read on the host (on a GPU each read waits for the device); the ones a cache
        # pads the mask with below change neither answer
        answers = torch.stack([(attention_mask > 1).any(), attention_mask[:, :total].all()]).tolist()
        packed, full = bool(answers[0]), bool(answers[1])
    if attention_mask is not None and not packed:
        if attention_mask.shape[1] == seq and past:
            attention_mask = F.pad(attention_mask, (past, 0), value=1)
        if full:
            attention_mask = None
    if attention_mask is None and (past == 0 or seq == 1):
        return None
    query_pos = torch.arange(past, total, device=device)[:, None]
    causal = torch.arange(total, device=device)[None, :] <= query_pos
    mask = causal[None, None].expand(batch, 1, seq, total)
    if packed:  # sample numbers: a query sees the keys of its own sample only
        segments = attention_mask[:, :total]
        same = segments[:, None, past:, None] == segments[:, None, None, :]
        mask = mask & same & (segments[:, None, None, :] > 0)
    elif attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :total].bool()
    if attention_mask is not None:
        # A query with no visible key (left padding) attends to itself: its output is never used,
        # and an all-masked row would turn into NaN.
        empty = ~mask.any(dim=-1, keepdim=True)
        if bool(empty.any()):
            own = torch.zeros_like(mask)
            own[..., torch.arange(seq), past + torch.arange(seq)] = True
            mask = mask | (empty & own)
    return mask


class QwenVLPreTrainedModel(PreTrainedModel):
    config_class = QwenVLConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QwenBlock", "VisionTransformer"]  # noqa: RUF012 - the name transformers reads
    _supports_sdpa = True
    main_input_name = "input_ids"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loading (`AutoModelForCausalLM.from_pretrained` after `import qwenvl_cli`); the
        resampler's fixed sin-cos table stays frozen, as in `load_checkpoint` (transformers makes every float
        tensor it loads trainable)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        visual = getattr(getattr(model, "transformer", None), "visual", None)
        if visual is not None:
            visual.attn_pool.pos_embed.requires_grad_(False)
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        first = next(module.parameters(), None)
        if first is None or first.is_meta:
            return  # weights about to be loaded: drawing random values would only cost time
        std = self.config.initializer_range
        if isinstance(module, VisionTransformer):
            module.init_weights(std)
        elif isinstance(module, QwenModel):
            nn.init.normal_(module.wte.weight, std=std)
        elif isinstance(module, QwenBlock):
            for linear in (module.attn.c_attn, module.mlp.w1, module.mlp.w2):
                nn.init.normal_(linear.weight, std=std)
            for linear in (module.attn.c_proj, module.mlp.c_proj):
                # Output projections are scaled down with depth, as in GPT-2.
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            for linear in (module.attn.c_attn, module.attn.c_proj, module.mlp.w1, module.mlp.w2, module.mlp.c_proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            nn.init.ones_(module.ln_1.weight)
            nn.init.ones_(module.ln_2.weight)
        elif isinstance(module, QwenVLForCausalLM):
            nn.init.normal_(module.lm_head.weight, std=std)
            nn.init.ones_(module.transformer.ln_f.weight)


class QwenVLForCausalLM(QwenVLPreTrainedModel, GenerationMixin):
    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.transformer = QwenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.score_all_positions = False  # upstream: logits (and their fp32 copy) for every position in training
        self.loss_chunk_elements = LOSS_CHUNK_ELEMENTS
        self.post_init()

    def use_upstream_path(self, on: bool = True) -> None:
        """Compute as the upstream model code does, for comparisons (`qwenvl train --recipe upstream`,
        `qwenvl profile --baseline upstream`): eager attention instead of SDPA, and in training the logits
        of every position rather than of the scored ones. Results are the same; speed and memory are not."""
        self.score_all_positions = on
        for block in self.transformer.h:
            block.attn.eager = on

    @property
    def compute_device(self) -> torch.device:
        """Where the model computes: the final norm's device. `next(parameters())` would be wte, which may wait
        in CPU memory during training (`embeddings_in_host_memory`, `park_frozen_originals`)."""
        return self.transformer.ln_f.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        position_ids: torch.Tensor | None = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        """`pixel_values` (n_images, 3, S, S) holds the batch's pictures in the order their `<img>` tokens
        appear, reading the batch row by row. With `labels`, the loss is the shifted cross-entropy averaged
        over labels != -100."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        hidden = self.transformer(input_ids, attention_mask, pixel_values, cache, inputs_embeds, position_ids)
        if labels is not None and self.training and not logits_to_keep and not self.score_all_positions:
            # Training needs the logits of the scored positions only: the lm_head and the fp32 softmax over
            # the vocabulary run there and nowhere else (pictures, prompts and padding are most of a row).
            # Long answers are scored in chunks of rows (see `chunked_scored_loss`), so the logits of one
            # chunk at a time exist, in the forward pass and again in the backward pass.
            targets = labels[:, 1:].to(hidden.device)
            scored = targets != IGNORE_INDEX
            loss = chunked_scored_loss(
                self.lm_head,
                hidden[:, :-1][scored],
                targets[scored],
                self.config.vocab_size,
                unused.get("num_items_in_batch"),
                self.loss_chunk_elements,
            )
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, unused.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def chunked_scored_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
    chunk_trainable: bool = False,
) -> torch.Tensor:
    """`scored_loss(lm_head(hidden), targets, …)` for (n, hidden) states of scored positions, without ever
    holding all n rows of logits. The rows are cut into chunks of `chunk_elements // vocab_size`; each
    chunk's logits, their fp32 copy and the softmax live only while that chunk's summed cross-entropy is
    computed, and the backward pass recomputes them one chunk at a time (activation checkpointing on the
    lm_head). The price is one more lm_head matmul over the scored rows (benchmarks/loss_memory_bench.py
    measures both).

    A trainable lm_head (full fine-tuning; LoRA on a base model, where peft trains a copy of it) is scored
    whole: its weight gradient (1.16 GiB in bf16 at 7B) would arrive once per chunk and be summed by
    autograd, holding two or three of them at once (measured on CPU at 512 rows: 3.5 GiB against 1.3 whole;
    at 2,048 rows no gain). `chunk_trainable=True` chunks it anyway, for that measurement."""
    rows = hidden.shape[0]
    chunk = max(1, chunk_elements // vocab_size)
    trainable = any(parameter.requires_grad for parameter in lm_head.parameters())
    if rows <= chunk or (trainable and not chunk_trainable) or not torch.is_grad_enabled():
        return scored_loss(lm_head(hidden), targets, num_items_in_batch)
    total = sum(
        checkpoint(_summed_cross_entropy, lm_head, piece, wanted, use_reentrant=False, preserve_rng_state=False)
        for piece, wanted in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    )
    if num_items_in_batch is None:
        return total / rows
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _summed_cross_entropy(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def scored_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy (fp32) of (n, vocab) logits against their n target ids: the mean, or the sum divided
    by `num_items_in_batch` (see `causal_lm_loss`)."""
    if num_items_in_batch is None:
        if targets.numel() == 0:  # nothing scored in this batch: a zero that keeps the graph
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float(), targets)
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token, averaged over labels != -100.

    With `num_items_in_batch` (the supervised tokens of all micro-batches of one optimizer step, which
    the transformers Trainer passes under gradient accumulation) the sum is divided by that count, so an
    accumulated step averages over its tokens exactly as one large batch would."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
