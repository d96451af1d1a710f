"""One training step under `torch.profiler`, kept small: the trace file and what it says about the host.

`qwenvl profile --trace DIR` runs one optimizer step more per cell, after the measured ones (so s/it is not
touched by the profiler's overhead), records it with `torch.profiler` and writes it as a gzipped Chrome trace
(ui.perfetto.dev opens it as it is; chrome://tracing after gunzip). The cell's `trace` summarises it:

- `operator_calls`: aten operator calls in the step, nested calls included. Each costs host time in Python
  and the dispatcher; a step whose seconds do not grow with its tokens is bound by these.
- `host_syncs`: the calls of operators that make the host wait for the GPU on CUDA (`.item()`, a boolean
  mask's `nonzero`, …). Counted on a CPU too, where they cost nothing but show where a GPU step would stall.
- On a GPU: `kernel_launches`, `host_wait_ms` (CPU time spent in the CUDA runtime's synchronising calls),
  `device_ms` (kernel time) and `device_busy` (kernel time ÷ the step's seconds: well under 1 is a step the
  GPU waits on the host for), and the kernels that take the most time.
- `sync_sites`: where those host syncs come from, by the Python lines (in qwenvl, transformers, peft,
  accelerate) that called them, counted during the cell's first warmup step by a hook on aten's dispatcher
  (`SyncCensus`; its overhead never reaches a measured or traced step), `Tensor.tolist()` and blocking copies
  from the GPU included. It sees the forward pass; on a GPU not the backward pass (autograd's device thread).
  On a GPU only calls on CUDA tensors are counted.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

# aten operators whose result the host must see (a Python number, or a size known only from the data): on
# CUDA each one blocks the host until the GPU has caught up.
SYNC_OPERATORS = {
    "aten::_local_scalar_dense": ".item() / int() / bool() of a tensor",
    "aten::nonzero": "nonzero (boolean-mask indexing, torch.where with one argument)",
    "aten::masked_select": "masked_select",
    "aten::_unique2": "unique",
    "aten::unique_consecutive": "unique_consecutive",
    "aten::unique_dim": "unique(dim=…)",
    "aten::equal": "torch.equal",
}
# CUDA runtime calls in which the host waits for the device.
SYNC_RUNTIME = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
TOP = 12


class TraceOp(BaseModel):
    name: str
    calls: int
    self_ms: float  # self CPU time of a host operator, device time of a kernel


class SyncSite(BaseModel):
    operator: str  # an aten name from SYNC_OPERATORS, TOLIST or TO_HOST
    calls: int  # in the census step (every micro-batch of one optimizer step)
    where: str  # the calling lines, innermost first


class StepTrace(BaseModel):
    file: str  # the gzipped Chrome trace
    seconds: float  # the traced step, profiler overhead included
    operator_calls: int
    host_syncs: dict[str, int] = Field(default_factory=dict)  # SYNC_OPERATORS name → calls (only those seen)
    host_ms: float  # self CPU time of all host operators
    top_host: list[TraceOp] = Field(default_factory=list)
    kernel_launches: int | None = None  # GPU only, from here on
    host_wait_ms: float | None = None
    device_ms: float | None = None
    device_busy: float | None = None
    top_kernels: list[TraceOp] = Field(default_factory=list)
    sync_sites: list[SyncSite] = Field(default_factory=list)

    def syncs_text(self) -> str:
        if not self.host_syncs:
            return "no host syncs"
        return ", ".join(f"{calls} × {name.removeprefix('aten::')}" for name, calls in self.host_syncs.items())

    def line(self) -> str:
        """One line for under the table."""
        text = f"{self.seconds:.2f} s traced, {self.operator_calls:,} operator calls, {self.syncs_text()}"
        if self.device_busy is not None:
            text += (
                f"; GPU busy {self.device_busy:.0%} ({self.device_ms:,.0f} ms of kernels, "
                f"{self.kernel_launches:,} launches), host waiting {self.host_wait_ms:,.0f} ms"
            )
        busiest = self.top_kernels[:3] if self.top_kernels else self.top_host[:3]
        if busiest:
            text += "; busiest: " + ", ".join(f"{op.name[:40]} {op.self_ms:,.0f} ms" for op in busiest)
        return text


def summarize(averages: list[Any], seconds: float, file: Path, top: int = TOP) -> StepTrace:
    """`StepTrace` from `profiler.key_averages()` (anything with the FunctionEventAvg attributes used here)."""
    from torch.autograd import DeviceType

    host = [e for e in averages if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    operators = [e for e in host if e.key.startswith("aten::")]
    syncs = {e.key: int(e.count) for e in operators if e.key in SYNC_OPERATORS and e.count}
    trace = StepTrace(
        file=str(file),
        seconds=round(seconds, 4),
        operator_calls=sum(int(e.count) for e in operators),
        host_syncs=dict(sorted(syncs.items(), key=lambda item: -item[1])),
        host_ms=round(sum(e.self_cpu_time_total for e in host) / 1000, 2),
        top_host=[
            TraceOp(name=e.key, calls=int(e.count), self_ms=round(e.self_cpu_time_total / 1000, 2))
            for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top]
        ],
    )
    runtime = {e.key: e for e in host}
    if kernels or any(name in runtime for name in LAUNCHES):
        device_ms = sum(e.self_device_time_total for e in kernels) / 1000
        trace.kernel_launches = sum(int(runtime[name].count) for name in LAUNCHES if name in runtime)
        trace.host_wait_ms = round(sum(runtime[n].cpu_time_total for n in SYNC_RUNTIME if n in runtime) / 1000, 2)
        trace.device_ms = round(device_ms, 2)
        trace.device_busy = round(device_ms / 1000 / seconds, 4) if seconds > 0 else None
        trace.top_kernels = [
            TraceOp(name=e.key, calls=int(e.count), self_ms=round(e.self_device_time_total / 1000, 2))
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
        ]
    return trace


class StepTracer:
    """Profile the optimizer step that follows `start()` until `stop()`; `finish()` writes the trace."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.profiler = None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, record_shapes=False, with_stack=False)
        self.profiler.start()

    def stop(self) -> None:
        import torch

        if self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.stop()

    def finish(self, seconds: float) -> StepTrace:
        if self.profiler is None:
            raise RuntimeError("the traced step never started")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.path))  # a path ending in .gz is written gzipped
        return summarize(list(self.profiler.key_averages()), seconds, self.path)


# Where a calling line is worth naming: the libraries a training step runs through (torch's own internals are not).
SITE_PACKAGES = ("qwenvl_cli", "transformers", "peft", "accelerate")
SITE_FRAMES = 3


def _site(frame) -> str:
    """The first SITE_FRAMES frames from SITE_PACKAGES, walking out from `frame`, as 'pkg/file.py:line function'."""
    found = []
    while frame is not None and len(found) < SITE_FRAMES:
        path = frame.f_code.co_filename.replace("\\", "/")
        for package in SITE_PACKAGES:
            marker = f"/{package}/"
            if marker in path:
                short = package + "/" + path.rsplit(marker, 1)[1]
                found.append(f"{short}:{frame.f_lineno} {frame.f_code.co_name}")
                break
        frame = frame.f_back
    return " ← ".join(found) if found else "(outside qwenvl, transformers, peft and accelerate)"


TOLIST = "Tensor.tolist"  # a copy to the host with no aten operator of its own on a CPU tensor
TO_HOST = "copy to the host"  # aten::_to_copy / aten::copy_ from a CUDA tensor into CPU memory, blocking


class SyncCensus:
    """Counts, by their calling lines, the calls that make the host wait for the GPU while started: the
    SYNC_OPERATORS (a TorchDispatchMode on this thread), `Tensor.tolist()` (wrapped while started: on a CPU
    tensor it calls no operator the mode could see) and blocking copies from CUDA into CPU memory."""

    def __init__(self, cuda_only: bool):
        self.cuda_only = cuda_only
        self.counts: Counter[tuple[str, str]] = Counter()
        self.mode = None
        self.tolist = None
        self.in_tolist = False

    def _count(self, name: str, frame) -> None:
        self.counts[name, _site(frame)] += 1

    def start(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        census = self

        def on_cuda(*values) -> bool:
            return any(isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in tree_leaves(values))

        def to_host(name: str, args, kwargs) -> bool:
            if name == "aten::_to_copy":
                device = (kwargs or {}).get("device")
                return args[0].is_cuda and device is not None and torch.device(device).type == "cpu"
            if name == "aten::copy_":
                non_blocking = (kwargs or {}).get("non_blocking", args[2] if len(args) > 2 else False)
                return args[1].is_cuda and args[0].device.type == "cpu" and not non_blocking
            return False

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                if name in SYNC_OPERATORS and (not census.cuda_only or on_cuda(args, kwargs)):
                    census._count(name, sys._getframe(1))
                elif not census.in_tolist and to_host(name, args, kwargs):
                    census._count(TO_HOST, sys._getframe(1))
                return func(*args, **(kwargs or {}))

        original = torch.Tensor.tolist

        def tolist(tensor):
            if not census.cuda_only or tensor.is_cuda:
                census._count(TOLIST, sys._getframe(1))
            census.in_tolist = True
            try:
                return original(tensor)
            finally:
                census.in_tolist = False

        self.tolist = original
        torch.Tensor.tolist = tolist
        self.mode = Mode()
        self.mode.__enter__()

    def stop(self) -> None:
        import torch

        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
        if self.tolist is not None:
            torch.Tensor.tolist = self.tolist
            self.tolist = None

    def sites(self, top: int = TOP) -> list[SyncSite]:
        return [
            SyncSite(operator=name, calls=calls, where=where) for (name, where), calls in self.counts.most_common(top)
        ]
