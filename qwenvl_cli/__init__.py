"""qwenvl: fine-tune Qwen-VL vision-language models from the command line."""

__version__ = "0.1.0"

import logging as _logging

# torchao (pulled in by gptqmodel) warns on import about CUDA-only kernels it cannot load on a CPU, and
# torch warns about its enum registration; neither concerns qwenvl's users.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
