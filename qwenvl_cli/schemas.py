"""Shared data models: the conversation format, its markup, and the validation report.

Every command reads and writes these types, so the rules that define the data (roles, the box
coordinate rule) live here exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# --------------------------------------------------------------------------------------------------
# Conversations

ROLES: tuple[str, ...] = ("user", "assistant")
Role = Literal["user", "assistant"]


class Turn(BaseModel):
    """One message of a conversation, as written in the data file (`{"from": ..., "value": ...}`)."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    role: Role = Field(alias="from")
    value: str


class Sample(BaseModel):
    """One training sample: an id and alternating user/assistant turns, user first."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    conversations: list[Turn] = Field(min_length=1)

    @model_validator(mode="after")
    def _alternating(self) -> Sample:
        for index, turn in enumerate(self.conversations):
            expected = ROLES[index % 2]
            if turn.role != expected:
                raise ValueError(f"turn {index} is {turn.role!r}, expected {expected!r}")
        return self

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "conversations": [{"from": t.role, "value": t.value} for t in self.conversations],
        }


# --------------------------------------------------------------------------------------------------
# Boxes: integers normalised to [0, 1000), x1 < x2, y1 < y2. The one place this rule is written.

COORD_LIMIT = 1000


def coordinate_problem(value: int) -> str | None:
    """Why one normalised coordinate is invalid, or None."""
    if not 0 <= value < COORD_LIMIT:
        return f"{value} is outside [0,{COORD_LIMIT})"
    return None


def box_problem(x1: int, y1: int, x2: int, y2: int) -> tuple[str, str] | None:
    """Why a box breaks the rule, as (kind, explanation) with kind 'range' or 'order'; None if valid."""
    for value in (x1, y1, x2, y2):
        problem = coordinate_problem(value)
        if problem:
            return "range", problem
    if x1 >= x2:
        return "order", f"x1={x1} is not less than x2={x2}"
    if y1 >= y2:
        return "order", f"y1={y1} is not less than y2={y2}"
    return None


class Box(BaseModel):
    """An axis-aligned box `(x1,y1),(x2,y2)` in coordinates normalised to [0, 1000)."""

    model_config = ConfigDict(frozen=True)

    x1: int
    y1: int
    x2: int
    y2: int

    @model_validator(mode="after")
    def _rule(self) -> Box:
        problem = box_problem(self.x1, self.y1, self.x2, self.y2)
        if problem:
            raise ValueError(problem[1])
        return self

    def to_text(self) -> str:
        return f"({self.x1},{self.y1}),({self.x2},{self.y2})"

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel corners in an image of `width`×`height` (as upstream draws them: int(v / 1000 * size))."""
        return (
            int(self.x1 / COORD_LIMIT * width),
            int(self.y1 / COORD_LIMIT * height),
            int(self.x2 / COORD_LIMIT * width),
            int(self.y2 / COORD_LIMIT * height),
        )

    @classmethod
    def from_pixels(cls, x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
        """Normalise pixel corners to [0,1000): floor(v * 1000 / size), clamped to 999."""

        def norm(value: float, size: int) -> int:
            return max(0, min(COORD_LIMIT - 1, math.floor(value * COORD_LIMIT / size)))

        return cls(x1=norm(x1, width), y1=norm(y1, height), x2=norm(x2, width), y2=norm(y2, height))


class Quad(BaseModel):
    """A quadrilateral: four `(x,y)` points in coordinates normalised to [0, 1000)."""

    model_config = ConfigDict(frozen=True)

    points: tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]

    @model_validator(mode="after")
    def _rule(self) -> Quad:
        for x, y in self.points:
            problem = coordinate_problem(x) or coordinate_problem(y)
            if problem:
                raise ValueError(problem)
        return self

    def to_text(self) -> str:
        return ",".join(f"({x},{y})" for x, y in self.points)


# --------------------------------------------------------------------------------------------------
# Parsed markup of one message. Spans keep the exact source text so that formatting them back gives
# the original string.


class TextSpan(BaseModel):
    kind: Literal["text"] = "text"
    text: str


class PictureSpan(BaseModel):
    """`Picture N: <img>PATH</img>`; `label` is the exact `Picture N: ` prefix ("" when absent)."""

    kind: Literal["picture"] = "picture"
    path: str
    number: int | None = None
    label: str = ""


class RefSpan(BaseModel):
    kind: Literal["ref"] = "ref"
    text: str


class BoxSpan(BaseModel):
    """`<box>RAW</box>`; `box` is set when RAW is a valid box."""

    kind: Literal["box"] = "box"
    raw: str
    box: Box | None = None


class QuadSpan(BaseModel):
    kind: Literal["quad"] = "quad"
    raw: str
    quad: Quad | None = None


MarkupSpan = Annotated[TextSpan | PictureSpan | RefSpan | BoxSpan | QuadSpan, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------------
# Validation report


class Severity(str, Enum):
    error = "error"
    warning = "warning"


class CheckInfo(BaseModel):
    """One entry of the check catalogue: a stable code, its name, and what to do about it."""

    code: str
    name: str
    severity: Severity
    category: str
    meaning: str
    fix: str


class Finding(BaseModel):
    """One problem found in the data."""

    code: str
    name: str
    severity: Severity
    message: str
    fix: str
    file: str
    line: int | None = Field(None, description="1-based line of the sample (or of the error) in the file")
    column: int | None = None
    sample_index: int | None = Field(None, description="0-based position of the sample in its file")
    sample_id: str | None = None
    turn: int | None = Field(None, description="0-based index of the turn in `conversations`")
    field: str | None = Field(
        None, description="Where in the sample, in the file's own keys: `conversations[1].value`, `messages[2].content`"
    )
    snippet: str | None = None


class FileSummary(BaseModel):
    path: str
    format: Literal["json", "jsonl"] | None = None
    readable: bool = True
    samples: int = 0
    valid_samples: int = 0


class HistogramBin(BaseModel):
    low: int
    high: int
    count: int


class LengthStats(BaseModel):
    """Token lengths of the samples in the chat template (258 tokens per picture)."""

    tokenizer: str
    max_length: int
    count: int
    min: int
    median: int
    p95: int
    max: int
    over_limit: int
    histogram: list[HistogramBin]


class ValidationReport(BaseModel):
    """What `qwenvl validate-data --format json` prints."""

    schema_version: int = 1
    qwenvl_version: str
    files: list[FileSummary]
    samples: int
    valid_samples: int
    errors: int
    warnings: int
    strict: bool
    counts: dict[str, int] = Field(description="number of findings per check code")
    findings: list[Finding]
    images_checked: int = 0
    urls_found: int = 0
    urls_checked: int = 0
    lengths: LengthStats | None = None
    clean_output: str | None = None
    elapsed_s: float
    exit_code: int = Field(description="0 clean, 1 errors found (or warnings with --strict), 2 unreadable")


# --------------------------------------------------------------------------------------------------
# Training runs


class RunManifest(BaseModel):
    """`qwenvl_run.json`: what a run folder holds and how it was made (read by resume, merge, chat)."""

    qwenvl_version: str
    method: Literal["full", "lora", "qlora"]
    precision: Literal["bf16", "fp16", "fp32"]
    base_model: str
    base_fingerprint: str
    chat_format: str
    quantisation: Literal["gptq", "nf4"] | None = None
    modules_to_save: list[str] = Field(default_factory=list)
    data_file: str
    data_sha256: str
    samples: int
    dropped_samples: int = 0
    arguments: dict = Field(default_factory=dict)
    packages: dict[str, str] = Field(default_factory=dict)
    global_step: int = 0
    final_loss: float | None = None
    processes: int = 1
    evaluations: list[dict] = Field(default_factory=list)
    created: str


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationSettings:
    """Greedy when `temperature` is 0; otherwise sampling with top-k (0: off) and top-p (1: off)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    use_cache: bool = True
    suppress_ids: tuple[int, ...] = ()  # never generated (e.g. picture tokens in a chat answer)
    vocab_limit: int | None = None  # ids from here on (a model's embedding padding) are never generated
