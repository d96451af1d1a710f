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
        from .render import print_error

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
    from .render import progress_hook, render_validation

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
    )
    with progress_hook(stderr) as hook:
        report = validate_data(paths, options, hook)
    if output_format is ReportFormat.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        render_validation(report, stdout, examples)
    raise typer.Exit(report.exit_code)


class Preset(str, Enum):
    tiny = "tiny"
    tiny_base = "tiny-base"
    qwen_vl_7b = "qwen-vl-7b"


@app.command("init-model")
@_service_errors
def init_model_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the checkpoint into.")],
    preset: Annotated[
        Preset,
        typer.Option(
            help="tiny: chat model for tests and demos; tiny-base: the same as a "
            "base model (chat_format raw); qwen-vl-7b: the official sizes."
        ),
    ] = Preset.tiny,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    vocab: Annotated[
        Path | None, typer.Option(help="A qwen.tiktoken to use instead of the built-in tiny vocabulary.")
    ] = None,
    weights: Annotated[
        bool | None,
        typer.Option(
            "--weights/--no-weights",
            help="Write random weights (default: yes, except for qwen-vl-7b).",
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
    """
    from .model.presets import init_model

    result = init_model(preset.value, output, seed=seed, vocab=vocab, weights=weights, force=force)
    what = (
        f"{result['parameters']:,} parameters"
        if result["weights_written"]
        else "config, tokenizer and generation config only (pass --weights for random weights, ~19 GB)"
    )
    stdout.print(
        f"[green]✓[/] wrote {result['preset']} to {result['output']}: {what}; "
        f"vocabulary {result['vocab_ranks']:,} ranks + specials, vocab_size {result['vocab_size']:,}."
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
