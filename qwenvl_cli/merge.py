"""`qwenvl merge`: fold a LoRA adapter into its base model and write a standalone checkpoint.

The output is a checkpoint folder in the model family's own layout (`ModelFamily.save_model`), the same as
any other model folder of that family; for Qwen-VL:

```
config.json, model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json,
qwen.tiktoken, generation_config.json, qwenvl_merge.json (where it came from)
```
Each LoRA-adapted weight becomes `W + scaling · B·A`, summed in fp32 and rounded once to the output
dtype; the layers trained in full (`modules_to_save`, e.g. `wte` and `lm_head` for LoRA on a Qwen-VL base
model) replace the base model's. The keys are the official ones (no `base_model.model.` prefix, no `lora_`
tensors).

The folder is written beside the target under a temporary name and renamed into place at the end, so an
interrupted or failed merge (or a failed `--verify`) leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from . import __version__
from .errors import QwenvlError
from .families import ModelFamily, family_for
from .schemas import RunManifest
from .sizes import parse_size

RUN_MANIFEST = "qwenvl_run.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_MANIFEST = "qwenvl_merge.json"
DTYPES = ("fp32", "bf16", "fp16")
# --verify compares logits of the adapter model and the merged model, both computed in fp32 on the CPU.
# In fp32 the two differ only by the order of the arithmetic: 1e-4 absolute. A 16-bit output rounds every
# weight once (bf16 keeps 8 significant bits, fp16 11), so there the bound is relative to the largest
# logit of the adapter model.
TOLERANCES: dict[str, tuple[float, bool]] = {"fp32": (1e-4, False), "fp16": (1e-2, True), "bf16": (5e-2, True)}
StageHook = Callable[[str], None]


class PromptCheck(BaseModel):
    """One prompt of --verify: the largest logit difference over every position and the vocabulary."""

    name: str
    tokens: int
    max_abs_diff: float
    top1_agreement: float = Field(description="share of positions where both models rank the same token first")


class Verification(BaseModel):
    tolerance: float = Field(description="absolute bound on the largest logit difference")
    tolerance_rule: str
    max_abs_diff: float
    passed: bool
    prompts: list[PromptCheck]


class MergeResult(BaseModel):
    """What `qwenvl merge` did; `written` is False when --verify failed (then nothing was written)."""

    schema_version: int = 1
    qwenvl_version: str = __version__
    adapter: str
    base: str
    output: str
    written: bool
    method: str
    dtype: Literal["fp32", "bf16", "fp16"]
    lora_r: int | None = None
    lora_layers: int = Field(description="LoRA-adapted layers folded into their weights")
    modules_to_save: list[str] = Field(default_factory=list, description="layers replaced by their trained copy")
    tensors: int = 0
    shards: int = 0
    total_bytes: int = 0
    max_shard_bytes: int
    files: list[str] = Field(default_factory=list)
    fingerprint: Literal["matches", "differs", "unchecked"] = Field(
        description="the base against the fingerprint in qwenvl_run.json: differs only with --force"
    )
    notes: list[str] = Field(default_factory=list)
    consumers: dict[str, str | None] = Field(
        default_factory=dict, description="program → None where the output loads in it, else what it lacks"
    )
    carried: list[str] = Field(default_factory=list, description="files copied over from the base model folder")
    verification: Verification | None = None
    elapsed_s: float
    exit_code: int = Field(0, description="0 written, 1 --verify found a difference above the tolerance")


# --------------------------------------------------------------------------------------------------
# Checks before anything loads


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QwenvlError(f"{path} cannot be read ({exc})", "Restore the file the training run wrote") from None
    if not isinstance(data, dict):
        raise QwenvlError(f"{path} is not a JSON object", "Restore the file the training run wrote")
    return data


def _adapter_folder(adapter_dir: str | Path | None) -> Path:
    """The adapter folder: the one given, or the current directory when it is a run folder."""
    if adapter_dir is None:
        here = Path.cwd()
        missing = [name for name in (RUN_MANIFEST, ADAPTER_CONFIG) if not (here / name).is_file()]
        if missing:
            raise QwenvlError(
                f"no adapter folder given, and the current directory {here} is not a LoRA run folder: "
                f"it has no {' and no '.join(missing)}",
                "Pass the run folder (qwenvl merge runs/chat-lora), or run the command inside it",
            )
        return here
    folder = Path(adapter_dir)
    if not folder.exists():
        raise QwenvlError(
            f"adapter folder {folder} does not exist", "Pass the folder a LoRA training run wrote (--output of train)"
        )
    if not folder.is_dir():
        raise QwenvlError(f"{folder} is a file, not an adapter folder", "Pass the folder a LoRA training run wrote")
    if not (folder / ADAPTER_CONFIG).is_file():
        if (folder / RUN_MANIFEST).is_file() and _read_json(folder / RUN_MANIFEST).get("method") == "full":
            raise QwenvlError(
                f"{folder} is a full fine-tuning run: it holds the whole model already, so there is nothing to merge",
                f"Use the folder as it is (load_checkpoint, or --model {folder} in eval and chat)",
            )
        raise QwenvlError(
            f"{folder} has no {ADAPTER_CONFIG}, so it is not a LoRA adapter folder",
            "Pass the folder a LoRA training run wrote (it holds adapter_config.json and adapter_model.safetensors)",
        )
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise QwenvlError(
            f"{folder} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}",
            "The run did not finish writing its adapter: pass a finished run folder, or train again",
        )
    return folder


class RunRecord(BaseModel):
    """What a run recorded about its base model: from its qwenvl_run.json, or for a checkpoint
    (`checkpoints/checkpoint-N`) from the run identity `checkpoints/run.json` beside it."""

    method: Literal["full", "lora", "qlora"]
    base_model: str
    base_fingerprint: str
    quantisation: Literal["gptq", "nf4"] | None = None
    source: str


def _run_record(folder: Path) -> RunRecord | None:
    path = folder / RUN_MANIFEST
    identity = folder.parent / "run.json"
    try:
        if path.is_file():
            manifest = RunManifest.model_validate(_read_json(path))
            return RunRecord(**manifest.model_dump(include=set(RunRecord.model_fields)), source=str(path))
        if folder.parent.name == "checkpoints" and identity.is_file():
            path = identity
            return RunRecord.model_validate({**_read_json(identity), "source": str(identity)})
    except ValidationError as exc:
        raise QwenvlError(
            f"{path} is not what a qwenvl run writes ({exc.error_count()} problem(s), e.g. {exc.errors()[0]['msg']})",
            "Restore the file the training run wrote, or move it away and pass --base DIR",
        ) from None
    return None


def _refuse_qlora(folder: Path, record: RunRecord | None, force: bool, notes: list[str]) -> None:
    if record is None or record.method != "qlora":
        return
    kind = {"gptq": "GPTQ Int4", "nf4": "NF4"}.get(record.quantisation or "", "4-bit")
    if force:
        notes.append(
            f"--force: this adapter was trained over {kind} weights; merged onto full-precision weights the "
            "result is approximate (compare it with --verify, and evaluate it)"
        )
        return
    if record.quantisation == "nf4":
        way_out = (
            f"add --force to merge onto the bf16/fp16 model it was quantised from ({record.base_model}), "
            "knowing the result is approximate"
        )
    else:
        way_out = (
            "merge onto the matching bf16/fp16 model (Qwen-VL-Chat for Qwen-VL-Chat-Int4) with --base DIR "
            "--force, knowing the result is approximate"
        )
    raise QwenvlError(
        f"{folder} was trained with Q-LoRA over {kind} weights: 4-bit weights cannot take the LoRA delta "
        "exactly, so merging after Q-LoRA is not supported (as in the upstream README)",
        f"Train with --method lora for an adapter that merges exactly, or {way_out}",
    )


def _base_folder(base: str | Path | None, record: RunRecord | None, adapter_config: dict, adapter: Path) -> Path:
    if base is not None:
        folder = Path(base)
        if not folder.is_dir():
            raise QwenvlError(
                f"--base {folder} does not exist" if not folder.exists() else f"--base {folder} is not a folder",
                "Pass the checkpoint folder the adapter was trained on",
            )
        return folder
    if record is not None:
        folder = Path(record.base_model)
        if not folder.is_dir():
            raise QwenvlError(
                f"the base model {folder} recorded in {record.source} does not exist (moved or deleted?)",
                "Pass its folder, or a copy of it, with --base DIR",
            )
        return folder
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    where = f" ({recorded!r} is not a folder here)" if recorded else ""
    raise QwenvlError(
        f"{adapter} has no {RUN_MANIFEST} and its {ADAPTER_CONFIG} names no base model folder{where}",
        "Pass the checkpoint folder the adapter was trained on with --base DIR",
    )


def _check_fingerprint(
    family: ModelFamily,
    base: Path,
    base_given: bool,
    record: RunRecord | None,
    adapter: Path,
    force: bool,
    notes: list[str],
) -> str:
    """Compare the base with the fingerprint the run recorded: matches, differs (with --force) or unchecked."""
    if record is None:
        notes.append(f"{adapter} has no {RUN_MANIFEST}: the base model could not be checked against a training run")
        return "unchecked"
    found = family.fingerprint(base)
    if found == record.base_fingerprint:
        return "matches"
    compared = f"config.json, {', '.join(family.tokenizer_files)} and the weight files' names and sizes"
    if force:
        notes.append(
            f"--force: {base} differs from the base model the adapter was trained on ({compared}); the merge is "
            "only right if its weights are those the adapter learnt against"
        )
        return "differs"
    if base_given:
        message = (
            f"--base {base} is not the model this adapter was trained on: its fingerprint {found[:12]} differs "
            f"from {record.base_fingerprint[:12]}, recorded for {record.base_model} in {record.source} ({compared})"
        )
    else:
        message = (
            f"the base model {base} changed since the adapter was trained on it: its fingerprint {found[:12]} "
            f"differs from {record.base_fingerprint[:12]} recorded in {record.source} ({compared})"
        )
    raise QwenvlError(
        message,
        "Pass the base model the run was trained on with --base DIR, or add --force to merge onto this one anyway",
    )


def _output_folder(output: str | Path | None, adapter: Path, base: Path, force: bool) -> Path:
    named = adapter if adapter.name not in ("", ".", "..") else adapter.resolve()
    target = Path(output) if output is not None else named.parent / f"{named.name}-merged"
    resolved = target.resolve()
    for name, source in (("adapter", adapter.resolve()), ("base model", base.resolve())):
        if resolved == source or resolved in source.parents:
            raise QwenvlError(
                f"--output {target} would replace the {name} folder {source}",
                "Write the merged model to a folder of its own (the default is <adapter folder>-merged)",
            )
    if target.exists() and not target.is_dir():
        raise QwenvlError(f"--output {target} is a file", "Pass a folder for the merged model")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise QwenvlError(
            f"the output folder {target} is not empty", "Choose a new --output, or pass --force to replace it"
        )
    return target


def _generation_config(family: ModelFamily, adapter: Path, base: Path) -> dict:
    for folder in (adapter, base):
        found = family.generation_config(folder)
        if found:
            return found
    return family.default_generation_config(family.tokenizer(base))


# --------------------------------------------------------------------------------------------------
# Merging


def _attach_adapter(model, adapter: Path, base: Path):
    from .inference import attach_adapter

    return attach_adapter(model, adapter, base).eval()


def fold_lora(peft_model) -> tuple[Any, int, list[str]]:
    """Fold every LoRA layer of a peft model into its weight (fp32 sum, one rounding to the weight's dtype)
    and unwrap it; returns (plain model, number of LoRA layers, names of the modules_to_save replaced)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    folded = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A and name not in getattr(module, "lora_embedding_A", {}):
                continue
            if name in getattr(module, "lora_variant", {}) or module.lora_bias.get(name):
                module.merge(safe_merge=True, adapter_names=[name])  # DoRA and other variants: peft's arithmetic
            else:
                weight = module.get_base_layer().weight
                with torch.no_grad():
                    merged = weight.float() + module.get_delta_weight(name).float()
                    if not torch.isfinite(merged).all():
                        raise QwenvlError(
                            "the merged weights hold NaN or inf values",
                            "The adapter is damaged or diverged in training: check its loss curve and train again",
                        )
                    weight.copy_(merged.to(weight.dtype))
            folded += 1
    replaced = sorted(
        {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    )
    return peft_model.unload(), folded, replaced


# --------------------------------------------------------------------------------------------------
# --verify


def verify_prompts(family: ModelFamily, tokenizer, config) -> list[tuple[str, dict]]:
    """A text prompt and a picture prompt (a bundled demo picture), in the family's chat template."""
    from .demo import DEMO_DIR

    processor = family.processor(tokenizer, config, image_root=DEMO_DIR)
    text = processor.encode_prompt([("user", "What colour is the circle? Answer in one word.")])
    image = processor.encode_prompt([("user", "Picture 1: <img>images/shapes_00.png</img>\nWhat is in the picture?")])
    return [("text", text), ("image", image)]


def prompt_logits(model, prompts: list[tuple[str, dict]]) -> list:
    import torch

    out = []
    with torch.no_grad():
        for _, batch in prompts:
            pixels = batch["pixel_values"]
            # the newer families' pictures also need their grid and token types (hf_vl_chat.VisionProcessor)
            extra = {k: batch[k] for k in ("image_grid_thw", "mm_token_type_ids") if batch.get(k) is not None}
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=None if pixels is None else pixels.float(),
                use_cache=False,
                **extra,
            ).logits
            out.append(logits.float())
    return out


def compare_logits(
    reference: list, merged: list, prompts: list[tuple[str, dict]], dtype: str, tolerance: float | None
) -> Verification:
    checks = []
    for (name, batch), ref, got in zip(prompts, reference, merged, strict=True):
        diff = (ref - got).abs().max().item()
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        tokens = int(batch["input_ids"].shape[1])
        checks.append(PromptCheck(name=name, tokens=tokens, max_abs_diff=diff, top1_agreement=agree))
    largest = max(c.max_abs_diff for c in checks)
    if tolerance is not None:
        bound, rule = tolerance, f"--tolerance {tolerance:g}"
    else:
        base, relative = TOLERANCES[dtype]
        if relative:
            scale = max(1.0, max(ref.abs().max().item() for ref in reference))
            bound, rule = base * scale, f"{dtype}: {base:g} × the largest |logit| ({scale:.3g})"
        else:
            bound, rule = base, f"{dtype}: {base:g} absolute"
    passed = largest <= bound
    return Verification(tolerance=bound, tolerance_rule=rule, max_abs_diff=largest, passed=passed, prompts=checks)


# --------------------------------------------------------------------------------------------------
# The service


def merge_adapter(
    adapter_dir: str | Path | None = None,
    output: str | Path | None = None,
    base: str | Path | None = None,
    max_shard_size: str | int = "2GB",
    dtype: str = "auto",
    verify: bool = False,
    tolerance: float | None = None,
    force: bool = False,
    on_stage: StageHook | None = None,
) -> MergeResult:
    """Merge the LoRA adapter in `adapter_dir` (default: the current directory, a run folder) into its base
    model and write the result to `output` (default: `<adapter_dir>-merged`) in the family's layout.

    The base model comes from the run's qwenvl_run.json (or adapter_config.json); `base` overrides it and is
    checked against the recorded fingerprint. `dtype` "auto" keeps the base model's precision. With `verify`
    a text and a picture prompt go through the adapter model and the merged model (fp32, CPU); when their
    logits differ by more than the tolerance nothing is written and `exit_code` is 1. The refusals about
    folders, fingerprints, Q-LoRA and sizes raise QwenvlError before any weights load.
    """
    started = time.perf_counter()
    stage = on_stage or (lambda text: None)
    limit = parse_size(max_shard_size)
    if dtype not in ("auto", *DTYPES):
        raise QwenvlError(f"unknown --dtype {dtype!r}", "Choose auto (the base model's), fp32, bf16 or fp16")
    if tolerance is not None and not tolerance >= 0:
        raise QwenvlError(f"--tolerance {tolerance} is negative", "Pass a bound of 0 or more, or leave it out")

    notes: list[str] = []
    adapter = _adapter_folder(adapter_dir)
    record = _run_record(adapter)
    adapter_config = _read_json(adapter / ADAPTER_CONFIG)
    if str(adapter_config.get("peft_type", "LORA")).upper() != "LORA":
        raise QwenvlError(
            f"{adapter} holds a {adapter_config.get('peft_type')} adapter, not LoRA",
            "qwenvl merge folds LoRA adapters only; load this one with peft on its base model instead",
        )
    _refuse_qlora(adapter, record, force, notes)
    base_dir = _base_folder(base, record, adapter_config, adapter)
    family = family_for(base_dir)
    config = family.config(base_dir)
    method = family.checkpoint_quantisation(config)
    if method is not None:
        raise QwenvlError(
            f"the base model {base_dir} is a quantised ({method}) checkpoint: the LoRA delta cannot be added to "
            "4-bit weights",
            "Pass the bf16/fp16 model it was quantised from (Qwen-VL-Chat for Qwen-VL-Chat-Int4) with --base DIR "
            "--force, knowing the result is approximate",
        )
    fingerprint = _check_fingerprint(family, base_dir, base is not None, record, adapter, force, notes)
    target = _output_folder(output, adapter, base_dir, force)
    declared = family.declared_precision(config)
    out_dtype = declared if dtype == "auto" else dtype
    generation = _generation_config(family, adapter, base_dir)

    # Weights load in the output dtype when nothing is lost that way; in fp32 for --verify (which runs in
    # fp32) and when the precision changes, so that each merged weight is rounded once.
    load_dtype = out_dtype if (out_dtype == declared and not verify) else "fp32"
    stage(f"loading {base_dir} ({load_dtype})")
    model, tokenizer = family.load(base_dir, load_dtype, "cpu")
    peft_model = _attach_adapter(model, adapter, base_dir)
    prompts = reference = None
    if verify:
        stage("running the adapter model on the verification prompts")
        prompts = verify_prompts(family, tokenizer, config)
        reference = prompt_logits(peft_model, prompts)
    stage("merging the adapter into the weights")
    merged, folded, replaced = fold_lora(peft_model)
    del peft_model, model
    if folded == 0:
        raise QwenvlError(
            f"the adapter in {adapter} adapts none of the model's layers",
            f"Check its target_modules in adapter_config.json against the model ({', '.join(family.lora_targets)})",
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.merging-", dir=target.parent))
    try:
        stage(f"writing {out_dtype} shards of at most {max_shard_size}")
        written = family.save_model(
            merged, staging / "model", base_dir, generation, dtype=out_dtype, max_shard_size=limit
        )
        tensors, shards, total = _inventory(written)
        del merged
        verification = None
        if verify:
            stage("running the merged model on the verification prompts")
            reloaded, _ = family.load(written, "fp32", "cpu")
            verification = compare_logits(reference, prompt_logits(reloaded, prompts), prompts, out_dtype, tolerance)
            del reloaded
        result = MergeResult(
            adapter=str(adapter),
            base=str(base_dir),
            output=str(target),
            written=verification is None or verification.passed,
            method=record.method if record else "lora",
            dtype=out_dtype,
            lora_r=adapter_config.get("r"),
            lora_layers=folded,
            modules_to_save=replaced,
            tensors=tensors,
            shards=shards,
            total_bytes=total,
            max_shard_bytes=limit,
            fingerprint=fingerprint,
            notes=notes,
            verification=verification,
            elapsed_s=0.0,
            exit_code=0 if verification is None or verification.passed else 1,
        )
        if result.written:
            result.consumers = family.consumers(written)
            result.carried = sorted(path.name for path in family.carried_files(base_dir))
            _write_provenance(written, result, record)
            result.files = sorted(p.name for p in written.iterdir())
            _publish(written, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.elapsed_s = round(time.perf_counter() - started, 3)
    return result


def _inventory(folder: Path) -> tuple[int, int, int]:
    """(tensors, shards, bytes) of a written checkpoint folder."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text("utf-8"))
        return len(data["weight_map"]), len(set(data["weight_map"].values())), int(data["metadata"]["total_size"])
    from safetensors import safe_open

    total = count = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            piece = handle.get_slice(key)
            numel = 1
            for n in piece.get_shape():
                numel *= n
            total += numel * _itemsize(piece.get_dtype())
            count += 1
    return count, 1, total


def _itemsize(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}[name]


def _write_provenance(folder: Path, result: MergeResult, record: RunRecord | None) -> None:
    record = {
        "qwenvl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter": str(Path(result.adapter).resolve()),
        "base_model": str(Path(result.base).resolve()),
        "base_fingerprint": result.fingerprint,
        "run_record": record.source if record else None,
        "run_method": record.method if record else None,
        "run_quantisation": record.quantisation if record else None,
        "dtype": result.dtype,
        "lora_r": result.lora_r,
        "lora_layers": result.lora_layers,
        "modules_to_save": result.modules_to_save,
        "notes": result.notes,
        "consumers": {name: "loads" if lack is None else lack for name, lack in result.consumers.items()},
        "carried_from_base": result.carried,
        "verification": result.verification.model_dump() if result.verification else None,
    }
    (folder / MERGE_MANIFEST).write_text(json.dumps(record, indent=2) + "\n", "utf-8")


def _publish(written: Path, target: Path, staging: Path) -> None:
    """Move the finished folder into place; an existing target (--force) is moved aside first and removed
    only once the new one is there."""
    old = None
    if target.exists():
        old = staging / "replaced"
        os.replace(target, old)
    try:
        os.replace(written, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
