"""`validate-data` as a service: read files, run every check, build the report, write the clean file."""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from .. import __version__
from ..errors import QwenvlError
from ..schemas import FileSummary, Finding, Severity, ValidationReport
from .boxes import CONVENTIONS, resize_of
from .checks import CHECKS
from .images import (
    MAX_PATH_BYTES,
    UrlChecker,
    check_local_image,
    default_cache_dir,
    is_url,
    resolve_local,
    run_parallel,
    url_problem,
)
from .lengths import LengthChecker
from .reader import DataFile, DataFileError, FileProblem
from .structure import ImageRef, SampleChecker

# Codes about a whole `conversations` list: in a messages sample they are about its `messages`.
_MESSAGES_LEVEL = frozenset({"S106", "S107", "S108", "S116", "S118"})

# stage ("read", "images"), done, total, detail
ProgressHook = Callable[[str, int, int, str], None]


class ValidateOptions(BaseModel):
    image_root: Path | None = None
    check_images: bool = True
    check_urls: bool = False
    url_timeout: float = 10.0
    url_cache: bool = True
    model: Path | None = None
    boxes: str | None = None  # --boxes: every sample's box convention (data/boxes.py), over its `boxes` key
    # the folder whose image processor sizes Qwen2.5-VL pixel boxes when `model` is not given (train passes its model)
    box_model: Path | None = None
    max_length: int = 2048
    strict: bool = False
    workers: int | None = None
    output_clean: Path | None = None


@dataclass
class _FileState:
    path: Path
    summary: FileSummary
    data: DataFile | None = None
    bad: set[int] = field(default_factory=set)
    warned: set[int] = field(default_factory=set)
    images: list[ImageRef] = field(default_factory=list)
    broken_lines: int = 0  # JSONL lines that are not JSON
    fields: dict[int, list[int]] = field(default_factory=dict)  # messages samples with pictures: turn -> message


class _Collector:
    """Turns (code, message, ...) into Findings, tracking which samples have errors or warnings."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.state: _FileState | None = None
        self.index: int | None = None
        self.line: int | None = None
        self.sample_id: str | None = None
        self.fields: list[int] | None = None  # messages samples: turn -> index in `messages`

    def sample(self, state: _FileState, index: int, line: int, value: object, fields: list[int] | None = None) -> None:
        self.state, self.index, self.line, self.fields = state, index, line, fields
        sid = value.get("id") if isinstance(value, dict) else None
        self.sample_id = sid if isinstance(sid, str) else (None if sid is None else str(sid))

    def emit(
        self, code: str, message: str, turn: int | None = None, snippet: str | None = None, fix: str | None = None
    ) -> None:
        where = None
        if self.fields is not None:
            if turn is None:
                where = "messages" if code in _MESSAGES_LEVEL else None
            elif turn < len(self.fields):
                where = f"messages[{self.fields[turn]}].content"
        self.add(code, message, self.state, self.index, self.line, self.sample_id, turn, snippet, fix, field=where)

    def add(
        self,
        code: str,
        message: str,
        state: _FileState,
        index: int | None,
        line: int | None,
        sample_id: str | None,
        turn: int | None = None,
        snippet: str | None = None,
        fix: str | None = None,
        column: int | None = None,
        field: str | None = None,
    ) -> None:
        info = CHECKS[code]
        if field is None and turn is not None and index is not None and index in state.fields:
            fields = state.fields[index]
            field = f"messages[{fields[turn]}].content" if turn < len(fields) else None
        self.findings.append(
            Finding(
                code=code,
                name=info.name,
                severity=info.severity,
                message=message,
                fix=fix or info.fix,
                file=state.summary.path,
                line=line,
                column=column,
                sample_index=index,
                sample_id=sample_id,
                turn=turn,
                field=field,
                snippet=snippet,
            )
        )
        if index is not None:
            (state.bad if info.severity is Severity.error else state.warned).add(index)


def validate_data(
    paths: Sequence[str | os.PathLike[str]],
    options: ValidateOptions | None = None,
    on_progress: ProgressHook | None = None,
) -> ValidationReport:
    """Check data files and return the report (and write `options.output_clean` when set)."""
    options = options or ValidateOptions()
    started = time.perf_counter()
    if not paths:
        raise QwenvlError("no data file given", "Pass one or more .json / .jsonl files")
    if options.boxes is not None and options.boxes not in CONVENTIONS:
        raise QwenvlError(f"--boxes {options.boxes} is not a box convention", f"Pass one of {', '.join(CONVENTIONS)}")
    states = [_FileState(Path(p), FileSummary(path=str(p))) for p in paths]
    if options.output_clean is not None:
        _refuse_overwriting_input(options.output_clean, states)

    lengths = None
    if options.model is not None:  # relative picture paths: under --image-root, else beside the first file
        root = options.image_root or Path(paths[0]).resolve().parent
        lengths = LengthChecker(options.model, options.max_length, image_root=root)
    collector = _Collector()
    resize = resize_of(options.model or options.box_model)[0]
    for state in states:
        _read_file(state, collector, lengths, on_progress, options, resize)

    image_stats = _check_images(states, options, collector, on_progress)

    order = {state.summary.path: i for i, state in enumerate(states)}
    collector.findings.sort(
        key=lambda f: (
            order[f.file],
            -1 if f.sample_index is None else f.sample_index,
            -1 if f.turn is None else f.turn,
        )
    )
    counts: dict[str, int] = {}
    for finding in collector.findings:
        counts[finding.code] = counts.get(finding.code, 0) + 1
    errors = sum(1 for f in collector.findings if f.severity is Severity.error)
    warnings = len(collector.findings) - errors
    for state in states:
        excluded = state.bad | state.warned if options.strict else state.bad
        state.summary.valid_samples = state.summary.samples - len(excluded)

    unreadable = any(not s.summary.readable for s in states)
    exit_code = 2 if unreadable else 1 if errors or (options.strict and warnings) else 0
    report = ValidationReport(
        qwenvl_version=__version__,
        files=[s.summary for s in states],
        samples=sum(s.summary.samples for s in states),
        valid_samples=sum(s.summary.valid_samples for s in states),
        errors=errors,
        warnings=warnings,
        strict=options.strict,
        counts={code: counts[code] for code in CHECKS if code in counts},
        findings=collector.findings,
        lengths=lengths.stats() if lengths is not None else None,
        elapsed_s=0.0,
        exit_code=exit_code,
        **image_stats,
    )
    if options.output_clean is not None and not unreadable:
        write_clean(states, options.output_clean, options.strict)
        report.clean_output = str(options.output_clean)
    report.elapsed_s = round(time.perf_counter() - started, 3)
    return report


def _refuse_overwriting_input(output: Path, states: list[_FileState]) -> None:
    target = output.resolve()
    for state in states:
        if state.path.exists() and state.path.resolve() == target:
            raise QwenvlError(
                f"--output-clean {output} is one of the input files",
                "Write the clean samples to a new file; the input is never modified",
            )


def _read_file(
    state: _FileState,
    collector: _Collector,
    lengths: LengthChecker | None,
    on_progress: ProgressHook | None,
    options: ValidateOptions,
    resize: tuple[int, int, int],
) -> None:
    summary = state.summary
    try:
        data = DataFile.open(state.path, options.boxes, options.image_root, resize)
    except DataFileError as exc:
        _file_problem(collector, state, exc.problem)
        return
    state.data = data
    summary.format = data.format
    checker = SampleChecker()
    total = data.size
    label = state.path.name
    progress = (lambda done: on_progress("read", done, total, label)) if on_progress is not None else None
    check, emit, add = checker.check, collector.emit, collector.add
    samples = 0
    # The loop allocates millions of long-lived objects and no cycles: the cyclic collector would only
    # walk them again and again.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for record in data.records(progress):
            samples += 1
            if record.problem is not None:
                state.broken_lines += 1
                problem = record.problem
                add(
                    problem.code,
                    f"line {problem.line}, column {problem.column}: {problem.message}",
                    state,
                    record.index,
                    problem.line,
                    None,
                    column=problem.column,
                )
                continue
            collector.sample(state, record.index, record.line, record.value, record.fields)
            if record.conversion:
                for problem in record.conversion:
                    add(
                        problem.code,
                        problem.message,
                        state,
                        record.index,
                        record.line,
                        collector.sample_id,
                        None,
                        None,
                        problem.fix,
                        field=problem.field,
                    )
            checked = check(record.index, record.line, record.value, emit)
            if checked.images:
                state.images.extend(checked.images)
                if record.fields is not None:
                    state.fields[record.index] = record.fields
            if lengths is not None and checked.turns and record.index not in state.bad:
                lengths.check(checked.turns, emit)
    except DataFileError as exc:
        _file_problem(collector, state, exc.problem)
    finally:
        if gc_was_enabled:
            gc.enable()
    summary.samples = samples
    if summary.readable and summary.samples == 0:
        _file_problem(collector, state, FileProblem("F006", f"{state.path} holds no samples"))
    elif state.broken_lines == summary.samples:
        summary.readable = False  # not one line of this "JSONL" file is JSON


def _file_problem(collector: _Collector, state: _FileState, problem: FileProblem) -> None:
    where = f"line {problem.line}, column {problem.column}: " if problem.line is not None else ""
    collector.add(problem.code, where + problem.message, state, None, problem.line, None, column=problem.column)
    state.summary.readable = False


def _check_images(
    states: list[_FileState], options: ValidateOptions, collector: _Collector, on_progress: ProgressHook | None
) -> dict[str, int]:
    jobs: dict[str, Callable] = {}
    keyed: list[tuple[_FileState, ImageRef, str]] = []
    urls_found = 0
    url_checker = None
    if options.check_urls:
        cache = default_cache_dir() / "url-checks.json" if options.url_cache else None
        url_checker = UrlChecker(options.url_timeout, cache)
    for state in states:
        root = options.image_root or state.path.resolve().parent
        for ref in state.images:
            if len(ref.path.encode("utf-8")) > MAX_PATH_BYTES:
                collector.add(
                    "I408",
                    f"{len(ref.path.encode('utf-8'))}-byte path",
                    state,
                    ref.sample_index,
                    ref.line,
                    ref.sample_id,
                    ref.turn,
                    _short_path(ref.path),
                )
            if is_url(ref.path):
                urls_found += 1
                problem = url_problem(ref.path)
                if problem is not None:
                    collector.add(
                        "I406",
                        f"{_short_path(ref.path)}: {problem}",
                        state,
                        ref.sample_index,
                        ref.line,
                        ref.sample_id,
                        ref.turn,
                    )
                elif url_checker is not None:
                    key = "url:" + ref.path
                    jobs.setdefault(key, lambda url=ref.path: url_checker.check(url))
                    keyed.append((state, ref, key))
            elif options.check_images:
                target = resolve_local(ref.path, root)
                key = "file:" + str(target)
                jobs.setdefault(key, lambda p=target: check_local_image(p))
                keyed.append((state, ref, key))
    if not jobs:
        return {"images_checked": 0, "urls_found": urls_found, "urls_checked": 0}
    workers = options.workers or min(32, (os.cpu_count() or 1) * 2)
    if url_checker is not None:
        workers = max(workers, 16)  # network waits, not CPU
    progress = (lambda done, total: on_progress("images", done, total, "images")) if on_progress is not None else None
    results = run_parallel(jobs.items(), len(jobs), workers, progress)
    if url_checker is not None:
        url_checker.save()
    for state, ref, key in keyed:
        result = results[key]
        if result.code is not None:
            fix = _path_hint(ref.path) if result.code == "I401" else None
            collector.add(
                result.code,
                result.message,
                state,
                ref.sample_index,
                ref.line,
                ref.sample_id,
                ref.turn,
                _short_path(ref.path),
                fix,
            )
    return {
        "images_checked": sum(1 for k in jobs if k.startswith("file:")),
        "urls_found": urls_found,
        "urls_checked": sum(1 for k in jobs if k.startswith("url:")),
    }


def _path_hint(path: str) -> str | None:
    """A more specific fix for a path that does not exist, when the cause is visible in the path."""
    if path != path.strip():
        return "Remove the spaces or newlines around the path inside <img>…</img>."
    if "\\" in path:
        return "Write the path with forward slashes (/); backslashes are not separators here."
    return None


def _short_path(path: str, width: int = 80) -> str:
    return path if len(path) <= width else path[: width // 2 - 1] + "…" + path[-(width // 2) :]


def write_clean(states: list[_FileState], output: Path, strict: bool) -> int:
    """Write every valid sample (errors excluded; warnings too under --strict) to `output`, atomically.
    JSONL when `output` ends in .jsonl/.ndjson, a JSON list otherwise. Returns the number written."""
    jsonl = output.suffix.lower() in (".jsonl", ".ndjson")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    written = 0
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            if not jsonl:
                handle.write("[")
            for state in states:
                if state.data is None:
                    continue
                excluded = state.bad | state.warned if strict else state.bad
                for record in state.data.records():
                    if record.index in excluded or record.problem is not None:
                        continue
                    sample = record.value if record.original is None else record.original
                    if jsonl:
                        handle.write(json.dumps(sample, ensure_ascii=False))
                        handle.write("\n")
                    else:
                        handle.write(",\n" if written else "\n")
                        handle.write(json.dumps(sample, ensure_ascii=False, indent=2))
                    written += 1
            if not jsonl:
                handle.write("\n]\n")
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QwenvlError(
            f"cannot write {output} ({exc.strerror or exc})", "Choose a writable location for --output-clean"
        ) from None
    except DataFileError as exc:
        tmp.unlink(missing_ok=True)
        raise QwenvlError(
            f"a data file changed while it was being checked ({exc.problem.message})",
            "Run validate-data again once nothing is writing to it",
        ) from None
    return written
