"""qwenvl: fine-tune Qwen-VL vision-language models from the command line."""

__version__ = "0.1.0"

import logging as _logging

# torchao (pulled in by gptqmodel) warns on import about CUDA-only kernels it cannot load on a CPU,
# bitsandbytes about an optional kernel package that must not be installed here, and torch about its
# enum registration; none of it concerns qwenvl's users.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

# transformers' AutoConfig / AutoModelForCausalLM / AutoTokenizer learn the native Qwen-VL (model_type "qwen")
# as soon as transformers' auto modules are first imported; nothing of transformers is imported here.
from .model import auto as _auto  # noqa: E402

_auto.install()


def quiet_import(module: str):
    """Import a module whose import prints a banner (gptqmodel), without the banner. Raises ImportError."""
    import contextlib
    import importlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(module)
