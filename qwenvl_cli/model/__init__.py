"""Native Qwen-VL: tokenizer and chat template (model, vision and checkpoint I/O come later)."""
