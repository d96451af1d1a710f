"""What `qwenvl train` takes and returns: `TrainOptions`, `TrainResult`, the event hook's type, and `RunSetup`,
what the steps of one run share once the model folder has been read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

EventHook = Callable[[str, dict[str, Any]], None]


class TrainOptions(BaseModel):
    method: Literal["full", "lora", "qlora"] = "lora"
    model: Path | None = None  # default: the built-in tiny model
    data: Path | None = None  # default: the bundled demo data
    output: Path | None = None  # default: runs/<method>-<date>-<time>
    image_root: Path | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    quant: Literal["gptq", "nf4"] | None = None
    max_length: int = Field(2048, ge=16)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(8, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    lr: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    lora_r: int = Field(64, ge=1)
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # default: the model family's (ModelFamily.lora_targets)
    train_vit: bool = False
    # learning rates of the trainable vision-tower and merger parameters (default: lr); --vision-lr implies
    # --train-vit under --method full. Qwen-VL (v1)'s merger is its resampler (attn_pool).
    vision_lr: float | None = Field(None, ge=0)
    merger_lr: float | None = Field(None, ge=0)
    # Qwen2-VL and later: the bounds of each picture's area after resizing (rounded to whole tokens of
    # (patch·merge)² pixels); None: the model folder's preprocessor_config.json. Recorded in the run folder's.
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    # torch.compile each LM and ViT block (regional compilation): fewer, fused kernels per step
    compile: bool = False
    packing: bool = False  # several samples per row of --max-length tokens, each in its own attention span
    # upstream: finetune.py's way, for comparisons: every sample padded to --max-length, eager attention,
    # logits of every position
    recipe: Literal["qwenvl", "upstream"] = "qwenvl"
    resume: str | None = None  # "auto" or a checkpoint folder
    seed: int = 42
    save_steps: int = 100
    save_total_limit: int = 3
    skip_invalid: bool = False
    boxes: str | None = None  # --boxes: the box convention of every sample of --data/--eval-data (data/boxes.py)
    workers: int = 0
    eval_data: Path | None = None
    eval_every: int = Field(100, ge=1)  # optimizer steps between evaluations
    eval_samples: int = Field(32, ge=1)  # samples of --eval-data asked by generation (all are in the loss)
    # experiment trackers of the Trainer: tensorboard (event files in <output>/tensorboard), wandb (offline in
    # <output>/wandb unless WANDB_MODE is set), mlflow (<output>/mlruns unless MLFLOW_TRACKING_URI is set)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    zero: Literal[2, 3] = 2
    offload: bool = False
    dry_run: bool = False
    # profile only: random weights built on the device from config.json (no weight files are read)
    random_weights: bool = False

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """ "none", "wandb" and "wandb,tensorboard" as well as a list; each tracker once."""
        if isinstance(value, str):
            value = [] if value.strip().lower() in ("", "none") else value.split(",")
        if isinstance(value, list | tuple):
            value = list(dict.fromkeys(str(item).strip().lower() for item in value if str(item).strip()))
            value = [item for item in value if item != "none"]
        return value


class TrainResult(BaseModel):
    output: str
    model: str = ""
    data: str = ""
    method: str
    precision: str
    engine: str = "ddp"
    notes: list[str]
    samples: int
    dropped_samples: int
    skipped_invalid: int
    trainable_parameters: int
    total_parameters: int
    global_step: int = 0
    final_loss: float | None = None
    seconds: float = 0.0
    train_seconds: float = 0.0  # wall time of the training loop (data loading included, model loading not)
    samples_seen: int = 0
    samples_per_second: float | None = None
    tokens_per_second: float | None = None  # real tokens per second of forward + backward + step
    padding_share: float | None = None  # share of computed positions that were padding
    resumed_from: str | None = None
    dry_run: bool = False
    loss_curve: str | None = None
    weights_gib: float = 0.0  # weights + gradients + AdamW states, activations not included
    processes: int = 1
    evaluations: list[dict] = Field(default_factory=list)  # step, eval_loss, accuracy, acc_at_50


@dataclass
class RunSetup:
    """What the steps of one run share once the model folder has been read and the rules resolved."""

    options: TrainOptions
    family: Any  # the ModelFamily of `model_dir`
    rules: Any  # presets.ResolvedRules
    model_dir: Path
    config: Any  # the family's config object
    tokenizer: Any
    generation: dict[str, Any]  # the model's generation_config.json
    quant: str | None  # "gptq" | "nf4" for Q-LoRA
    pixels: tuple[int, int] | None = None  # --min-pixels/--max-pixels resolved (the family's picture_pixels)

    @property
    def output(self) -> Path:
        return Path(self.options.output)

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"
