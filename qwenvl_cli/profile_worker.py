"""One cell of `qwenvl profile`, in a fresh process so that its peak memory is its own.

    python -m qwenvl_cli.profile_worker '<json spec>'

Builds the cell's samples (exact length, one picture each) in a scratch folder, trains through `run_training`
(the code `qwenvl train` runs) for warmup + steps optimizer steps, and prints one JSON line last: the
timestamps of the optimizer steps, peak memory, and the run's counts. With `trace` (a file name ending in
.json.gz) one optimizer step more runs after the measured ones under `torch.profiler` (`step_trace`); its
summary is the record's `trace`, and its seconds are not among the timestamps; the first warmup step then runs
under `SyncCensus` (not with --compile), whose sites go into the trace's `sync_sites`. A failure prints a JSON line
with `status` "oom" or "failed" and a one-line reason, and exits 1.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def run_cell(spec: dict) -> dict:
    import torch

    from qwenvl_cli.step_trace import StepTracer, SyncCensus
    from qwenvl_cli.train.lengths_data import make_data
    from qwenvl_cli.train.runner import TrainOptions, run_training

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    length = int(spec["length"])
    steps, warmup = int(spec["steps"]), int(spec["warmup"])
    per_step = int(spec["batch_size"]) * int(spec["grad_accum"])
    tracer = StepTracer(Path(spec["trace"])) if spec.get("trace") else None
    # where the host syncs come from: counted in the first warmup step, whose time is never used
    census_wanted = tracer is not None and warmup >= 1 and not spec.get("compile")
    census = SyncCensus(cuda_only=torch.cuda.is_available()) if census_wanted else None
    measured = steps + warmup
    steps_run = measured + (1 if tracer else 0)
    with tempfile.TemporaryDirectory(prefix="qwenvl-profile-") as scratch:
        work = Path(scratch)
        made = make_data(work / "data", Path(spec["model"]), [length] * per_step * steps_run, seed=0)
        if min(made) > length:
            return {
                "status": "failed",
                "reason": f"a sample of {length} tokens cannot hold one picture and an answer "
                f"(the shortest this model's template allows is {min(made)})",
            }
        if max(made) != length or min(made) != length:
            return {"status": "failed", "reason": f"could not build samples of exactly {length} tokens ({made[0]})"}
        options = TrainOptions(
            method=spec["method"],
            quant=spec.get("quant"),
            model=Path(spec["model"]),
            data=work / "data" / "data.json",
            output=work / "run",
            max_length=length,
            batch_size=spec["batch_size"],
            grad_accum=spec["grad_accum"],
            epochs=1.0,
            max_steps=steps_run,
            lr=1e-5,
            lr_scheduler="constant",
            save_steps=10**9,
            save_total_limit=1,
            recipe=spec.get("recipe", "qwenvl"),
            gradient_checkpointing=bool(spec.get("gradient_checkpointing", False)),
            random_weights=bool(spec.get("random_weights", False)),
            compile=bool(spec.get("compile", False)),
            seed=0,
        )
        stamps: list[float] = []
        losses: list[float] = []
        traced: list[float] = []  # the traced step's start and end

        gpu = torch.cuda.is_available()

        def on_event(kind: str, payload: dict) -> None:
            if kind == "steps":
                if gpu:  # the peak of training: what loading left in the allocator's cache is not counted
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                stamps[:] = [time.perf_counter()]
                if census is not None:
                    census.start()
            elif kind == "log" and traced:  # the traced step has ended
                tracer.stop()
                traced.append(time.perf_counter())
            elif kind == "log":
                if census is not None and len(stamps) == 1:
                    census.stop()
                stamps.append(time.perf_counter())
                losses.append(float(payload["loss"]))
                if tracer is not None and len(stamps) == measured + 1:
                    tracer.start()
                    traced.append(time.perf_counter())

        result = run_training(options, on_event=on_event)
        record = {
            "status": "ok",
            "stamps": stamps,
            "losses": losses,
            "global_step": result.global_step,
            "samples_seen": result.samples_seen,
            "parameters": result.total_parameters,
            "trainable_parameters": result.trainable_parameters,
            "precision": result.precision,
            "train_seconds": result.train_seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
            "device_name": torch.cuda.get_device_name(0) if gpu else "cpu",
        }
        if tracer is not None:
            if len(traced) != 2:
                return {"status": "failed", "reason": "the traced optimizer step did not run to its end"}
            trace = tracer.finish(traced[1] - traced[0])
            if census is not None:
                trace.sync_sites = census.sites()
            record["trace"] = trace.model_dump()
        if gpu:
            record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return record


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        record = run_cell(spec)
    except Exception as error:  # reported to the parent as the cell's reason; the grid goes on
        import torch

        oom = isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()
        from qwenvl_cli.errors import QwenvlError

        reason = (str(error).strip().splitlines() or [""])[0]
        if not isinstance(error, QwenvlError):
            reason = f"{type(error).__name__}: {reason}"
        record = {"status": "oom" if oom else "failed", "reason": reason[:300]}
    print(json.dumps(record), flush=True)
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
