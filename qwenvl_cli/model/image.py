"""Qwen-VL's picture preprocessing: a PIL image (from `qwenvl_cli.images.load_image`) to a tensor.

Preprocessing as the official processor: RGB, resize to size×size with bicubic (the aspect ratio is
not kept), /255, then CLIP's per-channel mean and std. Written on PIL and torch (torchvision does
not import beside the torch build this project pins).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from PIL import Image

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) float32, normalised, from any PIL image."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    x = pixels.permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std)


def preprocess_images(images: Iterable[Image.Image], size: int) -> torch.Tensor:
    """(n, 3, size, size) float32; (0, 3, size, size) for no images."""
    tensors = [preprocess_image(image, size) for image in images]
    if not tensors:
        return torch.zeros(0, 3, size, size)
    return torch.stack(tensors)
