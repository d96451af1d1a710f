"""Image checks: local files decode with PIL, URLs are well-formed and (optionally) answer.

Each distinct image is checked once, in a thread pool (Pillow releases the GIL while decoding).
JPEGs are decoded at reduced scale (`draft`), which still reads every byte of the entropy-coded data
(so truncation is caught) at a fraction of the cost.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit
MAX_PATH_BYTES = 255  # the upstream tokenizer stores a path in 256 byte positions
DECODE_SIZE = (448, 448)  # the model's input size; JPEGs need not be decoded larger
URL_CACHE_TTL_S = 24 * 3600
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True, slots=True)
class ImageResult:
    code: str | None = None  # None: fine
    message: str = ""


OK = ImageResult()


def is_url(path: str) -> bool:
    return _SCHEME_RE.match(path) is not None


def url_problem(url: str) -> str | None:
    """Why `url` cannot be fetched as written, or None."""
    scheme = _SCHEME_RE.match(url).group(1).lower()
    if scheme not in ("http", "https"):
        return f"scheme {scheme}:// is not supported (only http and https)"
    if any(ch.isspace() for ch in url):
        return "the URL contains white space (encode it as %20)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"the URL does not parse ({exc})"
    if not parts.hostname:
        return "the URL has no host name"
    return None


def resolve_local(path: str, root: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else root / candidate


def check_local_image(path: Path) -> ImageResult:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return ImageResult("I401", f"{path} does not exist")
    except OSError as exc:
        return ImageResult("I401", f"{path} cannot be read ({exc.strerror or exc})")
    if not path.is_file():
        return ImageResult("I402", f"{path} is {'a directory' if path.is_dir() else 'not a regular file'}")
    if stat.st_size == 0:
        return ImageResult("I403", f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    return ImageResult(
                        "I405", f"{path} is {width}×{height} = {width * height:,} pixels (limit {MAX_PIXELS:,})"
                    )
                if image.format == "JPEG":
                    image.draft("RGB", DECODE_SIZE)
                image.load()
    except Image.DecompressionBombError as exc:
        return ImageResult("I405", f"{path}: {exc}")
    except Exception as exc:  # PIL raises many types for broken files
        reason = str(exc) or type(exc).__name__
        if "cannot identify image file" in reason:
            reason = "not an image format PIL can read"
        return ImageResult("I404", f"{path} does not decode: {reason}")
    return OK


class UrlChecker:
    """Asks each URL once (HEAD, falling back to a ranged GET), with a timeout. Successes are remembered
    on disk for a day so that re-validating a data set does not ask again."""

    def __init__(self, timeout: float = 10.0, cache_file: Path | None = None):
        self.timeout = timeout
        self.cache_file = cache_file
        self._local = threading.local()
        self._lock = threading.Lock()
        self._good: dict[str, float] = {}
        if cache_file is not None and cache_file.is_file():
            try:
                now = time.time()
                loaded = json.loads(cache_file.read_text("utf-8"))
                self._good = {u: t for u, t in loaded.items() if now - float(t) < URL_CACHE_TTL_S}
            except (OSError, ValueError, AttributeError):
                self._good = {}

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "qwenvl-validate-data"
            self._local.session = session
        return session

    def check(self, url: str) -> ImageResult:
        if url in self._good:
            return OK
        import requests

        session = self._session()
        try:
            response = session.head(url, timeout=self.timeout, allow_redirects=True)
            if response.status_code in (403, 405, 501) or response.status_code >= 500:
                response = session.get(url, timeout=self.timeout, stream=True, headers={"Range": "bytes=0-1023"})
                response.close()
        except requests.Timeout:
            return ImageResult("I407", f"{url} did not answer within {self.timeout:g} s")
        except requests.RequestException as exc:
            return ImageResult("I407", f"{url} cannot be fetched ({type(exc).__name__}: {_first_line(exc)})")
        if response.status_code >= 400:
            return ImageResult("I407", f"{url} answered HTTP {response.status_code} {response.reason or ''}".strip())
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
            return ImageResult("I409", f"{url} is served as {content_type}, not as an image")
        with self._lock:
            self._good[url] = time.time()  # only clean answers are remembered
        return OK

    def save(self) -> None:
        if self.cache_file is None or not self._good:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self._good), "utf-8")
            os.replace(tmp, self.cache_file)
        except OSError:
            pass  # a cache that cannot be written only costs time next run


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def default_cache_dir() -> Path:
    if os.environ.get("QWENVL_CACHE_DIR"):
        return Path(os.environ["QWENVL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwenvl"


def run_parallel(
    jobs: Iterable[tuple[str, Callable[[], ImageResult]]],
    total: int,
    workers: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, ImageResult]:
    """Run `(key, job)` pairs in a thread pool, a bounded number in flight; returns each key's result."""
    results: dict[str, ImageResult] = {}
    workers = max(1, workers)
    window = workers * 32
    pending: dict = {}
    if on_progress is not None:
        on_progress(0, total)

    def collect(finished) -> None:
        for future in finished:
            results[pending.pop(future)] = future.result()
        if on_progress is not None:
            on_progress(len(results), total)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwenvl-img") as pool:
        for key, job in jobs:
            if len(pending) >= window:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                collect(finished)
            pending[pool.submit(job)] = key
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            collect(finished)
    return results
