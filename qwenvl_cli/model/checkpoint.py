"""Checkpoint folders in the official Qwen-VL layout: load and save.

```
config.json                        model_type "qwen", visual {...}
model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
  (or pytorch_model*.bin, read with weights_only=True)
qwen.tiktoken
generation_config.json             chat_format "chatml" (chat models) or "raw" (base models)
```
Loading builds the model on the meta device and assigns each tensor as it is read from its shard, so
the weights exist once in memory. Nothing in the folder is ever executed (no remote code, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import QwenvlError
from ..sizes import parse_size
from .config import QwenVLConfig
from .tokenizer import ENDOFTEXT, VOCAB_FILE, QwenVLTokenizer

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Buffers some exporters of the official code write next to the weights; they are recomputed here.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QwenvlError(f"{path} is not valid JSON ({exc})", "Restore the checkpoint's file") from None


def default_generation_config(tokenizer: QwenVLTokenizer, chat: bool = True) -> dict[str, Any]:
    """The official Qwen-VL(-Chat) generation settings, with this vocabulary's token ids."""
    eod = tokenizer.special_ids[ENDOFTEXT]
    return {
        "chat_format": "chatml" if chat else "raw",
        "do_sample": True,
        "eos_token_id": eod,
        "pad_token_id": eod,
        "max_new_tokens": 512,
        "max_window_size": 6144,
        "top_k": 0,
        "top_p": 0.3,
    }


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a checkpoint folder, safetensors preferred."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
            except (KeyError, ValueError) as exc:
                raise QwenvlError(f"{index} is not a valid shard index ({exc})", "Restore the file") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise QwenvlError(
                    f"{folder} lacks {len(missing)} shard(s) named in {index_name}: {', '.join(missing[:3])}",
                    "Download the missing files again",
                )
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise QwenvlError(
        f"{folder} has no weights (model.safetensors, a sharded index, or pytorch_model.bin)",
        "Pass a complete checkpoint folder",
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise QwenvlError(f"{path} cannot be read ({exc})", "The file is damaged: download it again") from None
    else:
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as exc:
            raise QwenvlError(
                f"{path} cannot be read safely ({type(exc).__name__}: {str(exc)[:200]})",
                "Only plain tensor checkpoints are loaded (weights_only); convert it to safetensors",
            ) from None
        yield from state.items()


def load_checkpoint(
    folder: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, QwenVLTokenizer]:
    """Load a Qwen-VL checkpoint folder: returns (model in eval mode, tokenizer). `dtype` defaults to the
    precision the checkpoint declares (bf16 for the official ones)."""
    from .modeling import QwenVLForCausalLM

    folder = Path(folder)
    config = QwenVLConfig.from_folder(folder)
    if config.quantization_config:
        raise QwenvlError(
            f"{folder} is a quantised ({config.quantization_config.get('quant_method', '?')}) checkpoint",
            "Load it with qwenvl_cli.model.quant.load_gptq (or train it with --method qlora)",
        )
    tokenizer = QwenVLTokenizer.from_pretrained(folder)
    if dtype is None:
        dtype = config.precision
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = QwenVLForCausalLM(config)
    assign_weights(
        model,
        folder,
        lambda key, t: t.to(device=device, dtype=target) if t.is_floating_point() else t.to(device),
        "the Qwen-VL layout",
        "Check that the folder holds a Qwen-VL checkpoint and that no shard is missing",
    )
    model.transformer.visual.attn_pool.pos_embed.requires_grad_(False)
    model.eval()
    return model, tokenizer


def assign_weights(
    model: torch.nn.Module,
    folder: Path,
    convert: Callable[[str, torch.Tensor], torch.Tensor],
    layout: str,
    fix: str,
) -> None:
    """Assign every tensor of the folder's shards to a model built on the meta device, shard by shard
    (`convert` casts or moves each one); raise QwenvlError naming missing and unknown tensors."""
    expected = set(model.state_dict())
    seen: set[str] = set()
    unexpected: list[str] = []
    for path in weight_files(folder):
        part: dict[str, torch.Tensor] = {}
        for key, tensor in iter_tensors(path):
            if key not in expected:
                if not key.endswith(IGNORED_SUFFIXES):
                    unexpected.append(key)
                continue
            part[key] = convert(key, tensor)
        seen.update(part)
        model.load_state_dict(part, strict=False, assign=True)
        del part
    missing = sorted(expected - seen)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unknown tensors (e.g. {', '.join(unexpected[:3])})")
        raise QwenvlError(f"{folder} does not match {layout}: " + "; ".join(detail), fix)


def save_checkpoint(
    model: Any,
    folder: str | Path,
    tokenizer_file: str | Path,
    generation_config: dict[str, Any] | None = None,
    max_shard_size: str | int = "2GB",
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
    carry: Sequence[Path] = (),
) -> Path:
    """Write `model` as an official-layout folder, atomically (a temporary folder renamed into place).
    `extra_config` adds fields to config.json (a base folder's `auto_map`); `carry` are files copied in as
    they are (the base folder's remote code, tokenizer config, font, README, licence)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise QwenvlError(f"{folder} is not empty", "Choose a new folder, or pass --force to replace it")
    limit = parse_size(max_shard_size)
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    state = {}
    for key, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        tensor = tensor.detach()
        if target is not None and tensor.is_floating_point():
            tensor = tensor.to(target)
        state[key] = tensor.contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config = model.config
        if target is not None:
            name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[target]
            config.bf16, config.fp16, config.fp32 = name == "bf16", name == "fp16", name == "fp32"
            config.dtype = target
        written = config.to_official_dict()
        written.update({key: value for key, value in (extra_config or {}).items() if key not in written})
        (tmp / "config.json").write_text(json.dumps(dict(sorted(written.items())), indent=2) + "\n", "utf-8")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", "utf-8")
        for path in carry:
            shutil.copyfile(path, tmp / path.name)
        shutil.copyfile(tokenizer_file, tmp / VOCAB_FILE)
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", "utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def model_fingerprint(folder: Path) -> str:
    """sha256 over config.json, qwen.tiktoken and the names and sizes of the weight files."""
    digest = hashlib.sha256()
    for name in ("config.json", VOCAB_FILE):
        path = folder / name
        if path.is_file():
            digest.update(path.read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()
