"""Native Qwen-VL (v1): config, language model, vision tower and resampler, tokenizer, template, processor,
datasets, generation, checkpoint I/O and quantisation. Commands reach it through `qwenvl_cli.families`."""
