"""qwenvl: fine-tune Qwen-VL vision-language models from the command line."""

__version__ = "0.1.0"
