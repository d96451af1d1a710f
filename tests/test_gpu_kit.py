"""benchmarks/gpu_wheels.py, the kit a lent GPU machine's session travels with: the trimmed bitsandbytes wheel
still installs with pip and keeps the CUDA 13 libraries, and the requirement check finds what the machine
would miss before any device time is spent."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "benchmarks" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_wheel(folder: Path, name: str, version: str, requires: list[str], files: dict[str, bytes]) -> Path:
    """A minimal valid wheel: the files, METADATA with `requires`, WHEEL, and a RECORD naming everything."""
    info = f"{name}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {line}\n" for line in requires)
    ).encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{path},,\n" for path in contents) + f"{info}/RECORD,,\n"
    contents[f"{info}/RECORD"] = record.encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in contents.items():
            archive.writestr(member, data)
    return path


def test_trimmed_bitsandbytes_keeps_cuda13_and_installs(kit, tmp_path):
    libraries = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    files = {f"bitsandbytes/libbitsandbytes_{lib}.so": b"\0" * 4096 for lib in libraries}
    files["bitsandbytes/__init__.py"] = b"__version__ = '0.50.2'\n"
    wheel = make_wheel(tmp_path, "bitsandbytes", "0.50.2", ["torch<3,>=2.4"], files)
    saved = kit.trim_native(wheel)
    assert saved > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {n.split("_", 1)[1].removesuffix(".so") for n in names if n.endswith(".so")}
    assert kept == {"cpu", "cuda130", "cuda132"}
    assert "cuda118" not in record and "libbitsandbytes_cuda130.so" in record
    assert kit.trim_native(wheel) == 0  # trimming again changes nothing
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (target / "bitsandbytes").glob("*.so")) == [
        "libbitsandbytes_cpu.so",
        "libbitsandbytes_cuda130.so",
        "libbitsandbytes_cuda132.so",
    ]


def test_requirement_check_finds_what_the_machine_would_miss(kit, tmp_path, monkeypatch):
    make_wheel(
        tmp_path,
        "alpha",
        "1.0",
        [
            "beta>=2",  # carried, too old
            "torch>=3",  # the image has 2.11.0
            "gamma",  # nowhere
            'tomli>=1; python_version < "3.11"',  # not for Python 3.12
            'sphinx; extra == "docs"',  # an extra: not installed
            "tqdm>=4",  # in the image, version not recorded
            "numpy>=1.17",  # in the image, 2.5.2
        ],
        {"alpha/__init__.py": b""},
    )
    make_wheel(tmp_path, "beta", "1.5", [], {"beta/__init__.py": b""})
    monkeypatch.setattr(kit, "qwenvl_requirements", lambda: [])
    problems, assumed = kit.check(tmp_path)
    assert sorted(problems) == [
        "alpha-1.0-py3-none-any.whl needs beta>=2: carried has 1.5",
        "alpha-1.0-py3-none-any.whl needs gamma: neither carried nor in the image",
        "alpha-1.0-py3-none-any.whl needs torch>=3: the image has 2.11.0",
    ]
    assert assumed == ["alpha-1.0-py3-none-any.whl needs tqdm>=4: in the image, version not recorded"]


def test_qwenvl_own_requirements_are_checked(kit, tmp_path):
    """With no wheels at all, qwenvl's pydantic requirement is met by nothing: the check says so."""
    problems, _ = kit.check(tmp_path)
    assert any(line.startswith("qwenvl needs pydantic") for line in problems)
    assert any(line.startswith("qwenvl needs tensorboardX") for line in problems)
