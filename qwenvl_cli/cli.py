"""The `qwenvl` command line: parse flags, call one service, render the result. No logic lives here."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import QwenvlError
from .families import FAMILIES

app = typer.Typer(
    name="qwenvl",
    help="Fine-tune Qwen-VL vision-language models: check your data before a GPU hour is spent.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
stdout = Console()
stderr = Console(stderr=True)


def _service_errors(command):
    """Turn expected mistakes into a one-paragraph message and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .render.common import print_error

        try:
            return command(*args, **kwargs)
        except QwenvlError as error:
            print_error(stderr, error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("[red]interrupted[/]: nothing was written.")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        stdout.print(f"qwenvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune Qwen-VL vision-language models."""


class ReportFormat(str, Enum):
    text = "text"
    json = "json"


@app.command("validate-data")
@_service_errors
def validate_data_command(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Data files (.json list or .jsonl). Default: the bundled demo data set.", show_default=False
        ),
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder that relative image paths start from. Default: each data file's folder."),
    ] = None,
    check_images: Annotated[
        bool, typer.Option("--images/--no-images", help="Open and decode every local image.")
    ] = True,
    check_urls: Annotated[
        bool, typer.Option("--check-urls", help="Ask every http(s) image URL whether it answers.")
    ] = False,
    url_timeout: Annotated[float, typer.Option(help="Seconds to wait for each URL.", min=0.1)] = 10.0,
    model: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder whose qwen.tiktoken counts tokens; enables the length checks."),
    ] = None,
    max_length: Annotated[int, typer.Option(help="Training sequence length for the length checks.", min=16)] = 2048,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", help="text: a summary for people; json: the full report.")
    ] = ReportFormat.text,
    output_clean: Annotated[
        Path | None,
        typer.Option(help="Write the valid samples here (.json or .jsonl); the input is never modified."),
    ] = None,
    strict: Annotated[bool, typer.Option(help="Treat warnings as errors.")] = False,
    examples: Annotated[int, typer.Option(help="Examples shown per check in the text summary.", min=0)] = 3,
    workers: Annotated[int | None, typer.Option(help="Threads for the image checks.", min=1)] = None,
    boxes: Annotated[
        str | None,
        typer.Option(
            help="Box convention of every sample (qwen-vl, qwen2-vl, qwen2.5-vl, qwen3-vl, pixels), over their "
            "`boxes` keys. Default: each sample's `boxes` key, else qwen-vl."
        ),
    ] = None,
) -> None:
    """Check data files for every mistake before training: structure, markup, boxes, images, lengths.

    Exit code 0 when clean, 1 when errors are found (warnings too with --strict), 2 when a file cannot
    be read or the command line is wrong.

    [bold]Examples[/]

      qwenvl validate-data train.json
      qwenvl validate-data train.jsonl --image-root /data/images --model ./Qwen-VL-Chat --max-length 1024
      qwenvl validate-data train.json --format json > report.json
      qwenvl validate-data train.json --output-clean train.clean.json
    """
    from .data.validate import ValidateOptions, validate_data
    from .render.validate import progress_hook, render_validation

    if not paths:
        from .demo import DEMO_DATA

        paths = [DEMO_DATA]
        if output_format is ReportFormat.text:
            stderr.print(f"[dim]No data file given: checking the bundled demo data set ({DEMO_DATA}).[/]")
    options = ValidateOptions(
        image_root=image_root,
        check_images=check_images,
        check_urls=check_urls,
        url_timeout=url_timeout,
        model=model,
        max_length=max_length,
        strict=strict,
        workers=workers,
        output_clean=output_clean,
        boxes=boxes,
    )
    with progress_hook(stderr) as hook:
        report = validate_data(paths, options, hook)
    if output_format is ReportFormat.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        render_validation(report, stdout, examples)
    raise typer.Exit(report.exit_code)


# init-model presets: every family's (qwenvl_cli.families), with their one-line descriptions for --help
Preset = Enum("Preset", {name: name for family in FAMILIES.values() for name in family.presets}, type=str)
PRESET_HELP = "; ".join(f"{name}: {text}" for family in FAMILIES.values() for name, text in family.presets.items())


@app.command("init-model")
@_service_errors
def init_model_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the checkpoint into.")],
    preset: Annotated[Preset, typer.Option(help=PRESET_HELP + ".")] = Preset.tiny,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    vocab: Annotated[
        Path | None, typer.Option(help="A qwen.tiktoken to use instead of the built-in tiny vocabulary.")
    ] = None,
    weights: Annotated[
        bool | None,
        typer.Option(
            "--weights/--no-weights",
            help="Write random weights (default: yes, except for the official-size presets: qwen-vl-7b, "
            "qwen-vl-7b-base, qwen2-vl-7b, qwen2.5-vl-7b, qwen3-vl-8b).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Write a randomly initialised Qwen-VL checkpoint in the official layout.

    The files are those of an official checkpoint: config.json, model.safetensors, qwen.tiktoken and
    generation_config.json, so every command can be tried end to end without downloading anything.

    [bold]Examples[/]

      qwenvl init-model --output models/tiny
      qwenvl init-model --preset tiny-base --output models/tiny-base
      qwenvl init-model --preset qwen-vl-7b --vocab Qwen-VL-Chat/qwen.tiktoken --output models/7b-config
      qwenvl init-model --preset qwen2.5-vl-7b --output models/qwen2.5-vl-7b-config   # config only
    """
    from .families import family_of_preset

    family = family_of_preset(preset.value)
    result = family.init_model(preset.value, output, seed=seed, vocab=vocab, weights=weights, force=force)
    what = (
        f"{result['parameters']:,} parameters"
        if result["weights_written"]
        else "config, tokenizer and generation config only ("
        + result.get("weights_note", "pass --weights for random weights, ~19 GB")
        + ")"
    )
    stdout.print(
        f"[green]✓[/] wrote {result['preset']} to {result['output']}: {what}; "
        f"vocabulary {result['vocab_ranks']:,} ranks + specials, vocab_size {result['vocab_size']:,}."
    )


# --------------------------------------------------------------------------------------------------
# qwenvl data synth · qwenvl eval

data_app = typer.Typer(
    help="Make data sets: synthetic pictures with conversations in the data format.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data")


@data_app.command("synth")
@_service_errors
def data_synth_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write train.json, eval.json and images/.")],
    n: Annotated[int, typer.Option("--n", help="Samples in all (train + eval).")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files.")] = 0,
    image_size: Annotated[int, typer.Option(help="Side of the square pictures, in pixels.")] = 224,
    eval_fraction: Annotated[float, typer.Option(help="Share of the samples held out in eval.json.")] = 0.1,
    force: Annotated[
        bool, typer.Option(help="Replace train.json, eval.json and images/ in a non-empty folder.")
    ] = False,
    max_shapes: Annotated[
        int, typer.Option(help="Most shapes in one picture (1–3); with 1, a colour is read at a glance.")
    ] = 3,
    questions: Annotated[
        str, typer.Option(help="Kinds of question asked, comma-separated: colour,count,grounding,compare.")
    ] = "colour,count,grounding,compare",
) -> None:
    """Write a synthetic data set of coloured shapes: colour, count and grounding questions.

    Pictures show 1–3 squares, circles and triangles; answers are short and always worded the same
    ("Red.", "There are 2.", <ref>the red circle</ref><box>…</box> with exact boxes), some
    conversations have several turns or two pictures. eval.json holds different pictures from
    train.json. The files pass validate-data.

    [bold]Examples[/]

      qwenvl data synth --output data/shapes --n 2000
      qwenvl data synth --output data/small --n 200 --seed 1 --eval-fraction 0.2
      qwenvl data synth --output data/shapes --n 5000 --image-size 448 --force
      qwenvl data synth --output data/colours --n 600 --max-shapes 1 --questions colour
    """
    from .data.synth import synthesize
    from .render.eval import count_progress, render_synth

    with count_progress(stderr, "drawing") as hook:
        kinds = [kind.strip() for kind in questions.split(",") if kind.strip()]
        summary = synthesize(output, n, seed, image_size, eval_fraction, force, hook, max_shapes, kinds)
    render_synth(summary, stdout)


@data_app.command("convert")
@_service_errors
def data_convert_command(
    source: Annotated[Path, typer.Argument(help="Data file (.json list or .jsonl), either data format.")],
    to: Annotated[
        str, typer.Option("--to", help="Target convention: qwen-vl, qwen2-vl, qwen2.5-vl, qwen3-vl or pixels.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write (.jsonl: JSON Lines; else a list).")],
    model: Annotated[
        Path | None,
        typer.Option(help="Model folder whose processor's min/max pixels size the pictures (--to qwen2.5-vl)."),
    ] = None,
    data_format: Annotated[
        str | None, typer.Option("--format", help="messages or conversations. Default: the input's.")
    ] = None,
    boxes: Annotated[
        str | None, typer.Option(help="Box convention of the input, over its samples' `boxes` keys.")
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder that relative image paths start from. Default: the data file's folder."),
    ] = None,
) -> None:
    """Write a data file with every box in a family's convention, declared in each sample's `boxes` key.

    Picture paths are kept. Qwen2.5-VL boxes are pixels of the processor-resized picture: sized with
    --model's processor settings, else the official defaults (the summary says which). Any sample that
    cannot be converted stops the command before anything is written.

    [bold]Examples[/]

      qwenvl data convert train.json --to qwen2.5-vl --model Qwen2.5-VL-7B-Instruct --output train.q25.json
      qwenvl data convert train.json --to qwen3-vl --format messages --output train.messages.jsonl
      qwenvl data convert export.jsonl --boxes qwen2.5-vl --to qwen-vl --output train.json
    """
    from .data.convert import convert_file

    summary = convert_file(source, to, output, model, data_format, boxes, image_root)
    stdout.print(
        f"Wrote {summary.output}: {summary.samples:,} samples ({summary.format} format), "
        f"{summary.boxes:,} boxes in the {summary.target} convention."
    )
    if summary.budget is not None:
        stdout.print(f"Qwen2.5-VL pixel boxes sized with {summary.budget}.")


@app.command("eval")
@_service_errors
def eval_command(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder (config.json, weights, qwen.tiktoken).")],
    data: Annotated[Path, typer.Option("--data", help="Data file (.json or .jsonl) with the reference answers.")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="LoRA adapter folder (adapter_config.json) to apply.")
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder that relative image paths start from. Default: the data file's folder."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N samples only.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated, in tokens.")] = 64,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", help="text: a summary for people; json: every number and example.")
    ] = ReportFormat.text,
) -> None:
    """Ask a model every question of a data file and score the answers (greedy decoding).

    Each assistant turn is asked with the reference conversation before it. Answers with boxes are
    scored by Acc@0.5: correct when every reference box has a predicted box with IoU ≥ 0.5. Other
    answers by exact match, ignoring case, surrounding spaces and a final period. The data is
    validated first; exit code 2 when it has errors or a folder is wrong.

    [bold]Examples[/]

      qwenvl eval --model models/tiny --data data/shapes/eval.json
      qwenvl eval --model Qwen-VL-Chat --adapter runs/lora --data eval.json --limit 200
      qwenvl eval --model models/tiny --data eval.json --format json > eval-report.json
    """
    from .evaluate import evaluate_folder
    from .render.eval import count_progress, render_eval

    with count_progress(stderr, "answering") as hook:
        report = evaluate_folder(model, data, adapter, image_root, limit, max_new_tokens, hook)
    if output_format is ReportFormat.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        render_eval(report, stdout)


class Method(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"


class PrecisionChoice(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Recipe(str, Enum):
    qwenvl = "qwenvl"
    upstream = "upstream"


class EngineChoice(str, Enum):
    ddp = "ddp"
    deepspeed = "deepspeed"
    fsdp = "fsdp"


class QuantChoice(str, Enum):
    gptq = "gptq"
    nf4 = "nf4"


@app.command("train")
@_service_errors
def train_command(
    ctx: typer.Context,
    method: Annotated[Method, typer.Option(help="full, lora or qlora (rules: docs/train.md).")] = Method.lora,
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint folder. Default: the built-in tiny model.", show_default=False)
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Training data (.json/.jsonl). Default: the bundled demo data.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Run folder. Default: runs/<method>-<date>-<time>.")
    ] = None,
    image_root: Annotated[Path | None, typer.Option(help="Folder relative image paths start from.")] = None,
    precision: Annotated[PrecisionChoice, typer.Option(help="auto: the method's rule (fp32 without a GPU).")] = (
        PrecisionChoice.auto
    ),
    quant: Annotated[QuantChoice | None, typer.Option(help="qlora: nf4 quantises a bf16/fp16 model at load.")] = None,
    max_length: Annotated[
        int,
        typer.Option(
            help="Longest sample in tokens (a Qwen-VL picture takes 258; newer families: by its size).", min=16
        ),
    ] = 2048,
    batch_size: Annotated[int, typer.Option(help="Samples per device and micro-batch.", min=1)] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", min=1)] = 8,
    epochs: Annotated[float, typer.Option(help="Passes over the data.", min=0.0)] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps (overrides --epochs).")] = -1,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the method's).")] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.", min=1)] = 64,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated module names that get LoRA adapters, or one regular expression over whole module "
            "names. Default: the model family's (Qwen-VL: c_attn,attn.c_proj,w1,w2; Qwen2-VL, Qwen2.5-VL, Qwen3-VL: "
            "the language model's attention and MLP projections).",
            show_default=False,
        ),
    ] = None,
    train_vit: Annotated[bool, typer.Option(help="full: also train the ViT.")] = False,
    vision_lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of the vision tower (default: --lr). full: implies --train-vit; LoRA: of the "
            "adapters that --lora-targets puts in the vision tower (none by default: refused).",
            min=0.0,
            show_default=False,
        ),
    ] = None,
    merger_lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of the merger, the vision→LM projection (Qwen3-VL: with deepstack_merger_list; "
            "Qwen-VL: the resampler attn_pool; default: --lr). LoRA: of adapters placed there.",
            min=0.0,
            show_default=False,
        ),
    ] = None,
    min_pixels: Annotated[
        int | None,
        typer.Option(
            help="Qwen2-VL and later: the least pixels a picture is resized to (rounded up to whole tokens of "
            "(patch·merge)² pixels; default: the model's preprocessor_config.json). Written into the run folder's.",
            min=1,
            show_default=False,
        ),
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            help="Qwen2-VL and later: the most pixels a picture is resized to, so at most max/(patch·merge)² tokens "
            "(rounded down; default: the model's). Qwen-VL's pictures are always 448×448.",
            min=1,
            show_default=False,
        ),
    ] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory.")] = False,
    compile: Annotated[
        bool,
        typer.Option(help="torch.compile each LM and ViT block: fused kernels; the first steps pay for compiling."),
    ] = False,
    packing: Annotated[
        bool, typer.Option(help="Several samples per row of --max-length tokens, each attending to itself only.")
    ] = False,
    recipe: Annotated[
        Recipe,
        typer.Option(help="upstream: finetune.py's way (pad to --max-length, eager attention), for comparisons."),
    ] = Recipe.qwenvl,
    resume: Annotated[
        str | None, typer.Option(help="auto: continue from the newest complete checkpoint; or a checkpoint folder.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N optimizer steps.", min=1)] = 100,
    skip_invalid: Annotated[bool, typer.Option(help="Drop samples with errors instead of stopping.")] = False,
    boxes: Annotated[
        str | None,
        typer.Option(
            help="Box convention of every sample of --data and --eval-data (qwen-vl, qwen2-vl, qwen2.5-vl, qwen3-vl, "
            "pixels), over their `boxes` keys; boxes are converted, then written in the model family's own. "
            "Default: each sample's `boxes` key, else qwen-vl."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes (pictures are decoded there).")] = 0,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out data: loss, exact match and Acc@0.5 every --eval-every steps.")
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Optimizer steps between evaluations.", min=1)] = 100,
    eval_samples: Annotated[int, typer.Option(help="Samples of --eval-data asked by generation.", min=1)] = 32,
    report_to: Annotated[
        str,
        typer.Option(
            help="Experiment trackers, comma-separated: tensorboard (<output>/tensorboard), wandb (offline in "
            "<output>/wandb unless WANDB_MODE is set), mlflow (<output>/mlruns unless MLFLOW_TRACKING_URI is set); "
            "each is told the run's qwenvl settings."
        ),
    ] = "none",
    config: Annotated[
        Path | None, typer.Option(help="YAML file with any of these options (flags given here win).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved plan and exit.")] = False,
    engine: Annotated[
        EngineChoice, typer.Option(help="ddp; deepspeed (ZeRO, see --zero and --offload); fsdp (full sharding).")
    ] = EngineChoice.ddp,
    zero: Annotated[int, typer.Option(help="DeepSpeed ZeRO stage: 2 or 3.", min=2, max=3)] = 2,
    offload: Annotated[
        bool,
        typer.Option(help="DeepSpeed: optimizer states (ZeRO-3: parameters too) in CPU memory; FSDP: parameters."),
    ] = False,
    gpus: Annotated[int, typer.Option(help="GPUs on this machine: N > 1 re-launches with torchrun (DDP).", min=1)] = 1,
    nproc: Annotated[int, typer.Option(help="CPU processes (DDP over gloo), for machines without GPUs.", min=1)] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines in all; run the same command on each.", min=1)] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's number, 0 … --nnodes − 1.", min=0)] = 0,
    master_addr: Annotated[
        str | None, typer.Option(help="Address of node 0, the same on every node (several machines).")
    ] = None,
    master_port: Annotated[
        int | None, typer.Option(help="Port on node 0 for the rendezvous (default 29500 across machines).")
    ] = None,
    hostfile: Annotated[
        Path | None,
        typer.Option(help="DeepSpeed hostfile (`host slots=N` lines): start every machine from here over ssh."),
    ] = None,
) -> None:
    """Fine-tune a Qwen-VL model: full, LoRA or Q-LoRA, with the method rules checked first.

    The run folder gets the adapter (LoRA, Q-LoRA) or the whole model (full) in a form that loads on its
    own, checkpoints to resume from, loss.png and qwenvl_run.json.

    [bold]Examples[/]

      qwenvl train                                   # LoRA on the built-in tiny model and demo data
      qwenvl train --method lora --model ./Qwen-VL-Chat --data train.json --output runs/chat-lora
      qwenvl train --method qlora --model ./Qwen-VL-Chat-Int4 --data train.json --precision fp16
      qwenvl train --config run.yaml --resume auto
      qwenvl train --gpus 4 --model ./Qwen-VL-Chat --data train.json   # DDP over 4 GPUs
      qwenvl train --gpus 8 --engine fsdp --method full --model ./Qwen-VL-Chat --data train.json
      qwenvl train --gpus 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --output /shared/run ...  # each node
      qwenvl train --hostfile hosts.txt --engine deepspeed --zero 3 --output /shared/run ...
    """
    from .render.train import render_train_result, train_progress
    from .train.config_file import read_config, train_options
    from .train.launch import LaunchPlan, plan_run, planned_command, process_group_plan, relaunch, train_argv, world
    from .train.runner import run_training

    launch_options = ("gpus", "nproc", "nnodes", "node_rank", "master_addr", "master_port", "hostfile")
    values = {name: value for name, value in ctx.params.items() if name not in ("config", *launch_options)}
    given = {name for name in ctx.params if _given(ctx, name)}
    options = train_options(values, given, config)
    if config is not None:
        given |= set(read_config(config))
    plan = LaunchPlan(max(gpus, nproc), gpus > 1, nnodes, node_rank, master_addr, master_port, hostfile)
    options, announcement = plan_run(options, given, plan)
    if announcement:
        stderr.print(f"[bold]built-in demo[/]: {announcement}")
    if dry_run:
        with train_progress(stderr) as hook:
            result = run_training(options, hook)
        render_train_result(result, stdout, planned_command(plan, options, set(ctx.params)))
        return
    relaunch_plan = process_group_plan(options, plan)
    if relaunch_plan is not None:
        stderr.print(f"launching {relaunch_plan.describe()}")
        raise typer.Exit(relaunch(relaunch_plan, train_argv(options, set(ctx.params))))
    with train_progress(stderr) as hook:
        result = run_training(options, hook)
    if world()[0] == 0:
        render_train_result(result, stdout)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was set on the command line (or by its environment variable)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


# Generation flags, shared by `chat` and `serve-ui`.
MaxNewTokensOption = Annotated[int, typer.Option(help="Longest answer, in tokens.")]
TemperatureOption = Annotated[float, typer.Option(help="0: greedy; above 0: sampling.")]
TopPOption = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of this probability.")]
TopKOption = Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0: off).")]
RepetitionPenaltyOption = Annotated[float, typer.Option(help="Above 1 discourages repeating tokens.")]
SeedOption = Annotated[int | None, typer.Option(help="Seed for sampling (the same seed, the same answer).")]


@app.command("chat")
@_service_errors
def chat_command(
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint folder. Default: the built-in tiny model.", show_default=False)
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter folder (a train run) to apply.")] = None,
    image: Annotated[
        list[str] | None, typer.Option("--image", help="Picture (path or URL) for the first message; repeatable.")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Ask this once, print the answer and exit.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: You are a helpful assistant.).")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="With --prompt: print {answer, boxes, image_with_boxes} as JSON.")
    ] = False,
    image_root: Annotated[Path | None, typer.Option(help="Folder relative picture paths start from.")] = None,
    save_dir: Annotated[Path, typer.Option(help="Where pictures with the boxes of grounded answers are saved.")] = Path(
        "chat-pictures"
    ),
    max_new_tokens: MaxNewTokensOption = 512,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: SeedOption = None,
) -> None:
    """Talk to a model about pictures: streamed answers, grounding boxes drawn on the picture.

    Interactive by default (/help lists the commands: /image, /clear, /history, /regen, /save, /system,
    /exit; Ctrl-C stops an answer). With --prompt it answers once and exits; --json prints the answer
    and its boxes (normalised and in pixels) for scripts. Pictures are numbered "Picture N:" across the
    conversation, as the model was trained. A base model (chat_format raw) is prompted without the
    chat template.

    [bold]Examples[/]

      qwenvl chat --model runs/full-20261126-155434
      qwenvl chat --model ./Qwen-VL-Chat --adapter runs/chat-lora --image photo.jpg
      qwenvl chat --model ./Qwen-VL-Chat --image photo.jpg --prompt "Where is the dog?" --json
    """
    from .chat import ask_once, generation_settings, open_conversation
    from .render.chat import chat_loop, render_boxes

    settings = generation_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    if json_output and prompt is None:
        raise QwenvlError("--json goes with --prompt", "Add --prompt TEXT, or leave out --json to chat")
    if model is None:
        from .train.defaults import builtin_model_dir

        model = builtin_model_dir()
    conversation = open_conversation(model, adapter, image_root, system)
    for picture in image or []:
        conversation.attach(picture)
    if prompt is None:
        title = f"{model}" + (f" + {adapter}" if adapter else "") + f" · {conversation.loaded.device}"
        chat_loop(conversation, settings, stdout, save_dir, title)
        return
    if json_output:
        result = ask_once(conversation, prompt, settings, save_dir)
        print(result.model_dump_json(indent=2))
        return
    result = ask_once(conversation, prompt, settings, save_dir, lambda piece: stdout.out(piece, end=""))
    stdout.out("")
    render_boxes(result, stderr)


@app.command("serve-ui")
@_service_errors
def serve_ui_command(
    model: Annotated[Path, typer.Option(help="Checkpoint folder (a Qwen-VL checkpoint, or one qwenvl wrote).")],
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter folder (a train run) to apply.")] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on. 0.0.0.0 opens the page to the whole network: add --auth.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 7860,
    share: Annotated[
        bool, typer.Option(help="Also publish the page at a public *.gradio.live address (through Gradio's servers).")
    ] = False,
    auth: Annotated[
        str | None,
        typer.Option(
            help="USER:PASS that the page asks for. The environment variable keeps it out of the process list.",
            envvar="QWENVL_UI_AUTH",
            show_default=False,
        ),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest picture accepted, in MB.", min=0.01)] = 20.0,
    system: Annotated[str | None, typer.Option(help="System prompt (default: You are a helpful assistant.).")] = None,
    max_new_tokens: MaxNewTokensOption = 512,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: SeedOption = None,
) -> None:
    """Chat with a model in the browser: pictures, streamed answers, grounding boxes drawn on the picture.

    A Gradio page over the same chat session as `qwenvl chat`: upload pictures (numbered Picture 1, 2, …
    across the conversation), ask, watch the answer being written, Stop it, Regenerate it, Clear; the
    generation flags below are the page's starting settings. Every browser tab has its own conversation;
    questions from several tabs wait in a queue, one answer at a time. Serves 127.0.0.1 only unless
    --host or --share says otherwise. Needs the ui extra: pip install "qwenvl\\[ui]". Ctrl-C stops it.

    [bold]Examples[/]

      qwenvl serve-ui --model runs/full-20261126-155434          # then open http://127.0.0.1:7860
      qwenvl serve-ui --model ./Qwen-VL-Chat --adapter runs/chat-lora --temperature 0.7 --seed 1
      QWENVL_UI_AUTH=alice:long-secret qwenvl serve-ui --model ./Qwen-VL-Chat --host 0.0.0.0 --port 8000
    """
    from .chat import generation_settings
    from .ui import ServeOptions, exposure_notes, parse_auth, require_gradio, serve

    options = ServeOptions(
        model=model,
        adapter=adapter,
        host=host,
        port=port,
        share=share,
        auth=parse_auth(auth),
        max_upload_mb=max_upload_mb,
        settings=generation_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed),
        system=system,
    )
    require_gradio()
    for note in exposure_notes(options):
        stderr.print(f"[yellow]note[/]: {note}.", highlight=False)
    stderr.print(f"loading {model}" + (f" + {adapter}" if adapter else "") + " …", highlight=False)

    def ready(local_url: str, share_url: str | None) -> None:
        stdout.print(f"[green]serving[/] {local_url}" + (f" and {share_url}" if share_url else ""), highlight=False)
        if share and not share_url:
            stderr.print("[yellow]note[/]: no public link could be made; the page is served locally only.")
        stderr.print("[dim]Ctrl-C stops the server.[/]")

    serve(options, ready)
    stderr.print("[dim]server stopped[/]")


@app.command("merge")
@_service_errors
def merge_command(
    adapter_dir: Annotated[
        Path | None,
        typer.Argument(
            help="LoRA run folder (adapter_config.json + qwenvl_run.json). Default: the current directory.",
            show_default=False,
            metavar="ADAPTER_DIR",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder for the merged model. Default: <adapter folder>-merged."),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(help="Base model folder, instead of the one qwenvl_run.json records (checked against it)."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard: 2GB, 500MB, 1.5GiB or a number of bytes.")
    ] = "2GB",
    dtype: Annotated[
        PrecisionChoice, typer.Option(help="Precision of the merged weights; auto: the base model's.")
    ] = PrecisionChoice.auto,
    verify: Annotated[
        bool, typer.Option(help="Compare the logits of the adapter model and the merged model (fp32, CPU).")
    ] = False,
    tolerance: Annotated[
        float | None,
        typer.Option(help="--verify bound on the largest logit difference (default 1e-4 in fp32; docs/merge.md)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Replace a non-empty output folder; accept a base that differs from the run's, or Q-LoRA."),
    ] = False,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", help="text: a summary for people; json: the result, for scripts.")
    ] = ReportFormat.text,
) -> None:
    """Fold a LoRA adapter into its base model: a standalone checkpoint in the official layout.

    Writes config.json, safetensors shards with their index, qwen.tiktoken and generation_config.json;
    the layers a base-model LoRA trains in full (wte, lm_head) are merged too. The base model is the one
    the run recorded, checked by fingerprint. The folder appears only when complete. A Q-LoRA adapter is
    refused (4-bit weights cannot take the LoRA delta exactly). Exit code 0 when written, 1 when --verify
    finds a larger difference than the tolerance (nothing is written then), 2 for a refusal.

    [bold]Examples[/]

      qwenvl merge runs/chat-lora                    # writes runs/chat-lora-merged
      qwenvl merge runs/chat-lora --output models/chat-merged --verify
      qwenvl merge runs/chat-lora --base /models/Qwen-VL-Chat --dtype bf16 --max-shard-size 5GB
      cd runs/chat-lora && qwenvl merge              # the current run folder
    """
    from .merge import merge_adapter
    from .render.merge import merge_stages, render_merge

    with merge_stages(stderr) as hook:
        result = merge_adapter(
            adapter_dir, output, base, max_shard_size, dtype.value, verify, tolerance, force, on_stage=hook
        )
    if output_format is ReportFormat.json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    else:
        render_merge(result, stdout)
    raise typer.Exit(result.exit_code)


# profile presets: every family's
ModelPreset = Enum("ModelPreset", {name: name for f in FAMILIES.values() for name in f.profile_presets}, type=str)


@app.command("profile")
@_service_errors
def profile_command(
    model: Annotated[
        Path | None, typer.Option(help="A Qwen-VL checkpoint folder (chat, or base with chat_format raw).")
    ] = None,
    preset: Annotated[
        ModelPreset | None, typer.Option(help="A built-in random model instead of --model. Default: tiny.")
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated: lora-chat, lora-base, qlora, full.")] = (
        "lora-chat,lora-base,qlora,full"
    ),
    lengths: Annotated[str, typer.Option(help="Comma-separated sample lengths in tokens.")] = "384,512,1024,2048",
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per device batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimizer step.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps measured per cell.")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Optimizer steps run first and not measured.")] = 1,
    baseline: Annotated[
        str | None, typer.Option(help="'upstream': also run every cell with --recipe upstream and report ratios.")
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="Mark each cell fits / does not fit in this much memory, e.g. 24GB (GiB).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads per cell. Default: torch's own choice.")
    ] = None,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in the backward pass, as the upstream scripts do.",
        ),
    ] = True,
    compile: Annotated[
        bool, typer.Option(help="Train with --compile (torch.compile of each block); warmup steps absorb compiling.")
    ] = False,
    vocab: Annotated[
        Path | None,
        typer.Option(
            help="With --preset qwen-vl-7b: the official qwen.tiktoken. Default: the built-in vocabulary in the "
            "official 151,936 embedding rows (same memory and speed; samples are built to exact lengths)."
        ),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            help="A folder: run one optimizer step more per cell under torch.profiler (not counted in s/it) and "
            "write it there as METHOD-LENGTH.json.gz (ui.perfetto.dev opens it); under the table: "
            "its operator calls, host syncs and busiest operators (GPU: kernel time and how busy the GPU was)."
        ),
    ] = None,
    output: Annotated[Path, typer.Option(help="The JSON result.")] = Path("profile.json"),
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw memory and s/it against length (PNG).")] = None,
) -> None:
    """Measure training memory and speed per method and sample length, with real optimizer steps.

    Every cell runs `qwenvl train`'s code in a fresh process on synthetic samples of exactly that length,
    one picture each; s/it is timed over the optimizer steps after --warmup. Memory is the CUDA allocator's
    peak reserved during training on a GPU, the process's peak RSS on a CPU (where everything trains in
    fp32). A cell that runs out of memory is shown as OOM and the grid goes on. --preset qwen-vl-7b,
    qwen2-vl-7b, qwen2.5-vl-7b or qwen3-vl-8b (GPU only) builds the official sizes with random weights on
    the GPU in each cell (NF4 for qlora): nothing is downloaded or written. Under the table: the tokens
    the samples' one picture takes in the model (its size after smart_resize for Qwen2-VL and later).
    Exit code 0 when the grid ran (failed cells included), 2 for a refusal.

    [bold]Examples[/]

      qwenvl profile                                      # tiny model, all methods, 384..2048 tokens
      qwenvl profile --methods lora-chat,full --lengths 384,512 --steps 2
      qwenvl profile --model /models/Qwen-VL-Chat --methods lora-chat,qlora --gpu-memory 24GB
      qwenvl profile --preset qwen-vl-7b --methods lora-chat,lora-base,qlora   # on a GPU, no download
      qwenvl profile --preset tiny-qwen2.5-vl --methods lora-chat,full --lengths 384,512
      qwenvl profile --preset qwen2.5-vl-7b --methods lora-chat --lengths 2048   # on a GPU, no download
      qwenvl profile --baseline upstream --markdown profile.md --plot profile.png
      qwenvl profile --methods lora-chat --lengths 2048 --trace traces   # where one step's time goes
    """
    from .profile import ProfileOptions, parse_lengths, parse_methods, parse_size_gib, run_profile
    from .render.profile import profile_markdown, profile_png, profile_progress, render_profile

    if baseline not in (None, "upstream"):
        raise QwenvlError(f"--baseline {baseline!r} is not known", "The one baseline is --baseline upstream")
    options = ProfileOptions(
        model=model,
        preset=preset.value if preset else None,
        methods=parse_methods(methods),
        lengths=parse_lengths(lengths),
        batch_size=batch_size,
        grad_accum=grad_accum,
        steps=steps,
        warmup=warmup,
        baseline=baseline,
        gpu_memory_gib=parse_size_gib(gpu_memory) if gpu_memory else None,
        threads=threads,
        gradient_checkpointing=gradient_checkpointing,
        compile=compile,
        vocab=vocab,
        trace=trace,
    )
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(partial) -> None:  # after every cell: a grid cut short keeps what it measured
        output.write_text(partial.model_dump_json(indent=2) + "\n", "utf-8")

    with profile_progress(stderr) as hook:
        result = run_profile(options, on_cell=hook, on_result=save)
    save(result)
    render_profile(result, stdout)
    written = [output]
    if markdown is not None:
        markdown.write_text(profile_markdown(result), "utf-8")
        written.append(markdown)
    if plot is not None:
        written.append(profile_png(result, plot))
    stdout.print("wrote " + ", ".join(str(path) for path in written))


def main() -> None:
    import os
    import warnings

    # Growable CUDA memory segments: less memory held but unused (fragmentation) in long training runs with
    # varying lengths; read when CUDA first allocates, inherited by launched processes. A user's value, under
    # either of PyTorch's names for it, wins.
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    # Deprecation notices that peft/transformers raise against each other are not actionable by users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    app()


if __name__ == "__main__":
    main()
