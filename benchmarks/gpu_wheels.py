#!/usr/bin/env python
"""The Python packages a lent GPU machine lacks, as wheels in `.whl/` (git-ignored), checked before any device
time is spent.

    python benchmarks/gpu_wheels.py            # downloads, trims, checks; prints the sizes and what it assumed
    python benchmarks/gpu_wheels.py --check    # only the check of what .whl/ holds

The lent machine (one H100/H200, Python 3.12, torch 2.11 with CUDA 13.0) reaches no package registry; what
`qwenvl` needs beyond its image travels with the working tree (64 MiB in all, the repository included) and is
installed there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` (benchmarks/gpu_session.sh
does it). This script:

1. downloads the wheels of WHEELS for CPython 3.12 on manylinux x86_64, in the versions pinned there;
2. builds DeepSpeed's wheel from its source distribution (PyPI has no wheel; its CUDA operations are compiled
   at first use on the machine, which has nvcc and ninja);
3. trims bitsandbytes to the CUDA 13 libraries the machine's torch loads (its wheel carries eight CUDA and six
   ROCm builds: 43 MB of the 64 MiB), rewriting the wheel's RECORD;
4. checks every requirement of every carried wheel, and of qwenvl itself, against the carried wheels and the
   machine's image (DEVICE: names as last read on the machine, versions where a session saw them): a
   requirement met by neither, or a version that does not match, stops it with exit 1; one met by an image
   package whose version nobody recorded is listed as assumed;
5. fails when the wheels and the repository together pass LIMIT_MIB.

Why transformers 5.24.0 and not the newest: 5.25 requires huggingface-hub 2.4 (the image has 1.33), which
brings httpx2, httpcore2, truststore and newer click, anyio and idna; 5.24.0 runs on the image's hub and was
the version of the last GPU run (H100, 2026-11-26). `tests/` pass with it (docs/profile.md says which).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / ".whl"
LIMIT_MIB = 63.0  # the working tree that travels: 64 MiB, repository included
WHEELS = {
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
    "transformers": "5.24.0",
    "regex": "2026.11.19",
    "peft": "0.21.2",
    "bitsandbytes": "0.50.2",
    "hjson": "3.1.0",
    "tensorboardx": "2.6.5",
}
SOURCE_BUILT = {"deepspeed": "0.19.8"}
# bitsandbytes keeps these native libraries (torch 2.11+cu130 loads the cuda130 one; cuda132 for a newer image)
KEEP_NATIVE = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
# The machine's image: names from the device's KINDS.md (read 2026-11-17); a version where a session printed it
# (None: present, version not recorded).
DEVICE = {
    "python": "3.12.3",
    "torch": "2.11.0",
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tiktoken": "0.14.0",
    "tokenizers": "0.23.2",
    "triton": "3.6.0",
    "torchvision": "0.26.0",
    **dict.fromkeys(
        [
            "aiohttp",
            "anyio",
            "certifi",
            "charset-normalizer",
            "click",
            "cloudpickle",
            "einops",
            "filelock",
            "fsspec",
            "hf-xet",
            "httpcore",
            "httpx",
            "idna",
            "jinja2",
            "markupsafe",
            "matplotlib",
            "msgpack",
            "networkx",
            "ninja",
            "packaging",
            "pillow",
            "protobuf",
            "psutil",
            "py-cpuinfo",
            "pyyaml",
            "requests",
            "rich",
            "setuptools",
            "shellingham",
            "sympy",
            "tqdm",
            "typer",
            "typing-extensions",
            "urllib3",
            "wheel",
        ]
    ),
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def download(dest: Path) -> None:
    platform_flags = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platform_flags, "-d", str(dest)]  # fmt: skip
    subprocess.run(command + [f"{name}=={version}" for name, version in WHEELS.items()], check=True)
    for name, version in SOURCE_BUILT.items():
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
             f"{name}=={version}"],
            check=True,
        )  # fmt: skip


def trim_native(wheel: Path) -> int:
    """Drop the native libraries KEEP_NATIVE does not name from a wheel (and from its RECORD): bytes saved."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        dropped = {n for n in names if n.endswith(".so") and "libbitsandbytes_" in n and not KEEP_NATIVE.search(n)}
        if not dropped:
            return 0
        with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".whl", delete=False) as handle:
            trimmed = Path(handle.name)
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename in dropped:
                    continue
                data = source.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode("utf-8").splitlines()
                    data = ("\n".join(line for line in lines if line.split(",")[0] not in dropped) + "\n").encode()
                target.writestr(info, data)
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def requirements_of(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode("utf-8")
    lines = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [Requirement(line) for line in lines]


def qwenvl_requirements() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    return [Requirement(line) for line in project["dependencies"]]


def check(dest: Path) -> tuple[list[str], list[str]]:
    """(problems, assumed): every requirement of the carried wheels and of qwenvl, for Python 3.12 on Linux."""
    environment = default_environment() | {
        "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
    }  # fmt: skip
    carried = {}
    wheels = sorted(dest.glob("*.whl"))
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in carried:
            raise SystemExit(f"two wheels of {name} in {dest}: keep one (pip stops on two)")
        carried[name] = version
    problems, assumed = [], []
    sources = [(wheel.name, requirements_of(wheel)) for wheel in wheels] + [("qwenvl", qwenvl_requirements())]
    for owner, requirements in sources:
        for requirement in requirements:
            if requirement.marker is not None and not requirement.marker.evaluate(environment | {"extra": ""}):
                continue
            name = canonicalize_name(requirement.name)
            if name in carried:
                version, where = carried[name], "carried"
            elif name in DEVICE:
                version = Version(DEVICE[name]) if DEVICE[name] else None
                where = "the image"
            else:
                problems.append(f"{owner} needs {requirement}: neither carried nor in the image")
                continue
            if version is None:
                if requirement.specifier:
                    assumed.append(f"{owner} needs {requirement}: in the image, version not recorded")
            elif not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{owner} needs {requirement}: {where} has {version}")
    return problems, sorted(set(assumed))


def tree_mib() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--check", action="store_true", help="only check what --dest holds")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    if not args.check:
        for old in args.dest.glob("*.whl"):
            old.unlink()
        download(args.dest)
        for wheel in args.dest.glob("bitsandbytes-*.whl"):
            saved = trim_native(wheel)
            print(f"trimmed {wheel.name}: {saved / 2**20:.1f} MiB of other CUDA/ROCm builds dropped")
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    repository = tree_mib()
    print(f"{total:7.2f} MiB  in {len(wheels)} wheels; the repository {repository:.2f} MiB; limit {LIMIT_MIB} MiB")
    problems, assumed = check(args.dest)
    for line in assumed:
        print(f"assumed: {line}")
    for line in problems:
        print(f"PROBLEM: {line}")
    if total + repository > LIMIT_MIB:
        problems.append("too large")
        print(f"PROBLEM: {total + repository:.1f} MiB would travel, over {LIMIT_MIB}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
