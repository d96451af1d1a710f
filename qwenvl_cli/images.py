"""Pictures in: open a local file or a URL (cached on disk), with an error that names the picture and the fix.
Every family's preprocessing starts from the PIL image this returns."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from .errors import QwenvlError


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
