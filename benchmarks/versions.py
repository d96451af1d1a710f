#!/usr/bin/env python
"""The versions a GPU run used, one line each (torch with its CUDA and device, then the libraries qwenvl
trains with); a library that does not import is reported as missing, never as a failure.

    python benchmarks/versions.py                 # the report
    python benchmarks/versions.py --require-cli   # the same, exit 1 when `qwenvl_cli.cli` does not import

Used by gpu_train_check.sh and gpu_session.sh."""

from __future__ import annotations

import importlib
import sys

LIBRARIES = (
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
    "gptqmodel",
    "pydantic",
    "huggingface_hub",
)


def main(argv: list[str]) -> int:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print("torch", torch.__version__, "cuda", torch.version.cuda, device)
    for name in LIBRARIES:
        try:
            print(name, getattr(importlib.import_module(name), "__version__", "?"))
        except Exception as exc:
            print(name, "missing:", type(exc).__name__, exc)
    if "--require-cli" in argv:
        try:
            importlib.import_module("qwenvl_cli.cli")
        except Exception as exc:
            print("qwenvl_cli.cli does not import:", type(exc).__name__, exc)
            return 1
        print("qwenvl_cli", importlib.import_module("qwenvl_cli").__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
