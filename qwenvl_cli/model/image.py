"""Images in: open a local file or a URL (cached on disk), then Qwen-VL's preprocessing to a tensor.

Preprocessing as the official processor: RGB, resize to size×size with bicubic (the aspect ratio is
not kept), /255, then CLIP's per-channel mean and std. Written on PIL and torch (torchvision does
not import beside the torch build this project pins).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from ..errors import QwenvlError

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


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _decode(source: str | Path | io.BytesIO, name: str) -> Image.Image:
    """Open and fully decode; an RGB image or a QwenvlError naming `name`."""
    try:
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise QwenvlError(
            f"Image {name} is too large to decode safely ({_one_line(exc)})",
            "Downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it.",
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise QwenvlError(
            f"Image {name} could not be decoded ({_one_line(exc)})",
            "Re-download or re-export the image as PNG or JPEG.",
        ) from exc


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(url: str, timeout: float) -> bytes:
    import requests

    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
        return response.content
    except requests.RequestException as exc:
        raise QwenvlError(
            f"Image {url} could not be downloaded ({_one_line(exc)})",
            "Check the URL and the network, or download the image and refer to the local copy.",
        ) from exc


def url_cache_path(url: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / hashlib.sha256(url.encode("utf-8")).hexdigest()


def load_image(ref: str, root: Path | None = None, timeout: float = 10.0, cache_dir: Path | None = None) -> Image.Image:
    """A fully decoded RGB image from a local path (relative to `root`) or an http(s) URL.

    URLs are fetched with `requests`; with `cache_dir`, the bytes of a URL that decoded are kept there
    under the sha256 of the URL and reused on later calls.
    """
    if is_url(ref):
        cached = url_cache_path(ref, cache_dir) if cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                return _decode(cached, ref)
            except QwenvlError:
                cached.unlink(missing_ok=True)  # a damaged cache entry: fetch again
        data = _download(ref, timeout)
        image = _decode(io.BytesIO(data), ref)
        if cached is not None:
            _atomic_write(cached, data)
        return image

    path = Path(ref).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.exists():
        raise QwenvlError(
            f"Image {path} does not exist",
            "Fix the path, or pass --image-root with the folder that relative paths start from.",
        )
    if not path.is_file():
        raise QwenvlError(f"Image {path} is not a file", "Point to the image file itself.")
    return _decode(path, str(path))
