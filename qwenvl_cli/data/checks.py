"""The catalogue of data checks: stable codes, names, severities, meanings and fixes.

Codes never change meaning once released; docs/data-format.md is generated from the same table
(and a test keeps the two in step).
"""

from __future__ import annotations

from ..schemas import CheckInfo, Severity

E, W = Severity.error, Severity.warning

_TABLE: list[tuple[str, str, Severity, str, str, str]] = [
    # code, name, severity, category, meaning, fix
    (
        "F001",
        "file-not-found",
        E,
        "file",
        "The data file does not exist.",
        "Check the path (relative paths are relative to the current directory).",
    ),
    (
        "F002",
        "file-not-regular",
        E,
        "file",
        "The path is a directory or not a regular file.",
        "Pass the .json or .jsonl file itself, not its folder.",
    ),
    (
        "F003",
        "file-not-utf8",
        E,
        "file",
        "The file is not valid UTF-8 text.",
        "Re-save it as UTF-8, e.g. `iconv -f GBK -t UTF-8 in.json > out.json`.",
    ),
    (
        "F004",
        "file-not-json",
        E,
        "file",
        "The file (or, in JSONL, one line) is not valid JSON; the line and column are given.",
        "Fix the syntax at that line and column (trailing commas, single quotes and unescaped "
        "newlines inside strings are the usual causes).",
    ),
    (
        "F005",
        "top-level-not-list",
        E,
        "file",
        "A .json file must hold a list of samples at the top level.",
        "Wrap the samples in [ ... ], or write one sample per line as JSONL.",
    ),
    (
        "F006",
        "file-empty",
        E,
        "file",
        "The file holds no samples.",
        "Add samples, or check that you passed the right file.",
    ),
    (
        "S101",
        "sample-not-object",
        E,
        "sample",
        "A sample is not a JSON object.",
        'Each sample must be {"id": ..., "conversations": [...]}.',
    ),
    (
        "S102",
        "id-missing",
        E,
        "sample",
        "The sample has no `id`.",
        'Give every sample a unique string id, e.g. "id": "identity_0".',
    ),
    (
        "S103",
        "id-not-string",
        E,
        "sample",
        "The `id` is not a string.",
        'Write the id as a string: "id": "42" rather than "id": 42.',
    ),
    ("S104", "id-empty", E, "sample", "The `id` is an empty string.", "Give the sample a non-empty unique id."),
    (
        "S105",
        "id-duplicate",
        E,
        "sample",
        "Another sample in the same file already uses this `id`.",
        "Make ids unique (append the line number, for instance).",
    ),
    (
        "S106",
        "conversations-missing",
        E,
        "sample",
        "The sample has no `conversations`.",
        'Add "conversations": [{"from": "user", ...}, {"from": "assistant", ...}].',
    ),
    (
        "S107",
        "conversations-not-list",
        E,
        "sample",
        "`conversations` is not a list.",
        "Make `conversations` a list of turns.",
    ),
    (
        "S108",
        "conversations-empty",
        E,
        "sample",
        "`conversations` is an empty list.",
        "Add at least one user turn and one assistant turn, or drop the sample.",
    ),
    (
        "S109",
        "turn-not-object",
        E,
        "sample",
        "A turn is not a JSON object.",
        'Each turn must be {"from": "user" | "assistant", "value": "..."}.',
    ),
    (
        "S110",
        "turn-missing-from",
        E,
        "sample",
        "A turn has no `from` key.",
        'Add "from": "user" or "from": "assistant" (OpenAI-style "role"/"content" must be renamed).',
    ),
    (
        "S111",
        "turn-missing-value",
        E,
        "sample",
        "A turn has no `value` key.",
        'Add "value": "..." (OpenAI-style "content" must be renamed to "value").',
    ),
    (
        "S112",
        "value-not-string",
        E,
        "sample",
        "A turn's `value` is not a string.",
        "Write the message as one string; put pictures inline as `Picture 1: <img>path</img>\\n`.",
    ),
    (
        "S113",
        "role-unknown",
        E,
        "sample",
        "A turn's `from` is neither `user` nor `assistant`.",
        "Use `user` or `assistant` (`human` → `user`, `gpt` → `assistant`).",
    ),
    (
        "S114",
        "first-turn-not-user",
        E,
        "sample",
        "The conversation does not start with a user turn.",
        "Start with the user's message; the system prompt is set by the chat template, not by a turn.",
    ),
    (
        "S115",
        "roles-not-alternating",
        E,
        "sample",
        "Two consecutive turns have the same role.",
        "Alternate user and assistant: merge the two messages or insert the missing turn.",
    ),
    (
        "S116",
        "last-turn-not-assistant",
        W,
        "sample",
        "The conversation ends with a user turn: it teaches nothing after the last answer.",
        "End with the assistant's answer, or drop the trailing user turn.",
    ),
    (
        "S117",
        "value-empty",
        E,
        "sample",
        "A turn's `value` is empty or only whitespace.",
        "Write the message, or remove the turn together with its answer.",
    ),
    (
        "S118",
        "sample-duplicate",
        W,
        "sample",
        "The conversation is identical to an earlier sample's (ids aside).",
        "Drop the copy unless the repetition is deliberate (it weights that sample twice).",
    ),
    (
        "S119",
        "key-unknown",
        W,
        "sample",
        "The sample has a key that training ignores.",
        "Remove it, or move its content into the conversation (an `image` field must become "
        "`Picture 1: <img>path</img>\\n` in the first user turn).",
    ),
    (
        "M201",
        "tag-unclosed",
        E,
        "markup",
        "An `<img>`, `<ref>`, `<box>` or `<quad>` tag is never closed.",
        "Add the closing tag, e.g. `<box>(10,20),(300,400)</box>`.",
    ),
    (
        "M202",
        "tag-stray",
        E,
        "markup",
        "A closing tag has no matching opening tag.",
        "Remove it or add the opening tag before it.",
    ),
    (
        "M203",
        "tag-nested",
        E,
        "markup",
        "A markup tag is opened inside another one.",
        "Close the first tag before opening the next: `<ref>dog</ref><box>(1,2),(3,4)</box>`.",
    ),
    (
        "M204",
        "special-token",
        E,
        "markup",
        "Text contains a ChatML control token (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, "
        "`<|extra_N|>`, `<imgpad>`) that would corrupt the chat template.",
        "Remove the token from the text; the template adds its own.",
    ),
    (
        "M205",
        "picture-numbering",
        E,
        "markup",
        "`Picture N:` labels do not count 1, 2, 3… across the conversation.",
        "Renumber the pictures in order of appearance, starting from 1 and continuing across turns.",
    ),
    (
        "M206",
        "picture-in-assistant",
        W,
        "markup",
        "An assistant turn contains a picture.",
        "Pictures belong in user turns; the model is never trained to emit an image path.",
    ),
    (
        "M207",
        "ref-without-box",
        W,
        "markup",
        "A `<ref>` is not directly followed by a `<box>` or `<quad>`.",
        "Write `<ref>text</ref><box>(x1,y1),(x2,y2)</box>`, or drop the `<ref>` tags.",
    ),
    (
        "M208",
        "picture-unlabelled",
        W,
        "markup",
        "An `<img>` is not preceded by the `Picture N: ` label the model was trained with.",
        "Write `Picture 1: <img>path</img>\\n` exactly (capital P, one space after the colon).",
    ),
    (
        "M209",
        "image-path-empty",
        E,
        "markup",
        "`<img></img>` holds no path or URL.",
        "Put the image path or http(s) URL between the tags.",
    ),
    (
        "B301",
        "box-malformed",
        E,
        "box",
        "A `<box>` (or `<quad>`) is not `(x1,y1),(x2,y2)` with integer coordinates.",
        "Write integers normalised to [0,1000) with no spaces: `(120,45),(380,700)`.",
    ),
    (
        "B302",
        "box-out-of-range",
        E,
        "box",
        "A coordinate is outside [0,1000).",
        "Normalise pixel coordinates: x * 1000 // width, y * 1000 // height.",
    ),
    (
        "B303",
        "box-inverted",
        E,
        "box",
        "x1 ≥ x2 or y1 ≥ y2: the box is empty or its corners are swapped.",
        "Write the top-left corner first: (x1,y1) = (min x, min y), (x2,y2) = (max x, max y).",
    ),
    (
        "B304",
        "quad-points",
        E,
        "box",
        "A `<quad>` does not have exactly four points.",
        "Write four corners: `(x1,y1),(x2,y2),(x3,y3),(x4,y4)`.",
    ),
    (
        "I401",
        "image-not-found",
        E,
        "image",
        "A local image path does not exist.",
        "Fix the path, or pass --image-root with the folder that relative paths start from.",
    ),
    (
        "I402",
        "image-not-a-file",
        E,
        "image",
        "An image path names a directory or a special file.",
        "Point to the image file itself.",
    ),
    ("I403", "image-empty", E, "image", "An image file is empty (0 bytes).", "Re-download or re-export the image."),
    (
        "I404",
        "image-undecodable",
        E,
        "image",
        "An image does not decode (truncated, corrupt, or not an image).",
        'Re-download or re-export the image; `python -c "from PIL import Image; Image.open(p).load()"` '
        "reproduces the error.",
    ),
    (
        "I405",
        "image-too-large",
        E,
        "image",
        "An image has more pixels than Pillow's decompression-bomb limit (89,478,485).",
        "Downscale it first (the model sees 448×448 anyway).",
    ),
    (
        "I406",
        "url-malformed",
        E,
        "image",
        "An image URL is malformed or uses a scheme other than http(s).",
        "Use a complete http:// or https:// URL, or download the image and use its local path.",
    ),
    (
        "I407",
        "url-unreachable",
        E,
        "image",
        "With --check-urls: the image URL did not answer with success.",
        "Fix the URL or download the image and refer to the local copy.",
    ),
    (
        "I408",
        "image-path-too-long",
        W,
        "image",
        "The path or URL is longer than 255 UTF-8 bytes, which the upstream Qwen-VL code cannot read.",
        "Shorten it (move or rename the images) if the data will also be used with upstream code.",
    ),
    (
        "I409",
        "url-not-image",
        W,
        "image",
        "With --check-urls: the URL answered with a non-image content type.",
        "Check that the URL points at the image itself, not at a web page that shows it.",
    ),
    (
        "L501",
        "too-long-cuts-image",
        E,
        "length",
        "The sample is longer than --max-length and truncation would cut inside a picture.",
        "Raise --max-length, or split the conversation so each part fits.",
    ),
    (
        "L502",
        "too-long-no-target",
        E,
        "length",
        "The sample is longer than --max-length and nothing of the assistant's answers would remain.",
        "Raise --max-length, shorten the prompt, or split the conversation.",
    ),
    (
        "L503",
        "too-long",
        W,
        "length",
        "The sample is longer than --max-length and will be truncated.",
        "Raise --max-length or shorten the sample; the truncated tail is not learned.",
    ),
]

CHECKS: dict[str, CheckInfo] = {
    code: CheckInfo(code=code, name=name, severity=sev, category=cat, meaning=meaning, fix=fix)
    for code, name, sev, cat, meaning, fix in _TABLE
}

CATEGORY_TITLES = {
    "file": "File",
    "sample": "Sample structure",
    "markup": "Markup",
    "box": "Boxes",
    "image": "Images",
    "length": "Length (with --model)",
}

# Checks whose failure makes the whole file unusable (exit code 2).
FATAL_FILE_CODES = frozenset({"F001", "F002", "F003", "F005", "F006"})


def check(code: str) -> CheckInfo:
    return CHECKS[code]


def catalogue_markdown() -> str:
    """The check table of docs/data-format.md (kept in step by a test)."""
    rows = ["| code | check | severity | meaning | fix |", "|---|---|---|---|---|"]
    for info in CHECKS.values():
        cells = [f"`{info.code}`", info.name, info.severity.value, info.meaning, info.fix]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)
