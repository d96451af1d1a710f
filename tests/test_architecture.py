"""The layout of docs/architecture.md, checked: who may import whom, no import cycle, nothing model-specific
outside the model families. Every `import` counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwenvl_cli"

# Layers, lowest first: a module may import its own layer and the layers below, never one above.
BASE = {"errors", "schemas", "markup", "grounding", "sizes", "images", "charts", "demo", "__init__"}
LAYERS = [
    ("base", lambda m: m.split(".")[0] in BASE),
    ("model", lambda m: m.startswith("model")),
    ("families", lambda m: m.startswith("families")),
    ("data", lambda m: m.startswith("data")),
    ("services", lambda m: m.split(".")[0] in SERVICES or m.startswith("train")),
    ("render", lambda m: m.startswith("render")),
    ("cli", lambda m: m in ("cli", "__main__")),
]
SERVICES = {"inference", "evaluate", "chat", "merge", "profile", "profile_worker", "step_trace", "ui"}
# The one allowed exception: the package root installs the (lazy) registration of the native classes with
# transformers' Auto classes, so that `import qwenvl_cli` is all a library user needs (docs/model.md).
ALLOWED = {("__init__", "model.auto")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """The qwenvl_cli modules `path` imports (relative and absolute), as names inside the package."""
    here = module_name(path).split(".")
    # the package (as parts) that relative imports start from; the root `__init__` is the root itself
    package = [] if path == PACKAGE / "__init__.py" else here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "qwenvl_cli":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import quiet_import` or `from .train import runner`
                candidate = [*target, alias.name]
                if resolve(candidate):
                    found.add(resolve(candidate))
                elif resolve(target):
                    found.add(resolve(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qwenvl_cli" and resolve(alias.name.split(".")[1:]):
                    found.add(resolve(alias.name.split(".")[1:]))
    found.discard(module_name(path))
    return found


def resolve(parts: list[str]) -> str | None:
    if not parts:
        return "__init__"
    path = PACKAGE.joinpath(*parts)
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return ".".join(parts)
    return None


def layer(module: str) -> int:
    for index, (_, member) in enumerate(LAYERS):
        if member(module):
            return index
    raise AssertionError(f"qwenvl_cli.{module} is in no layer of docs/architecture.md: add it there and here")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer_and_imports_no_layer_above_its_own(graph):
    upward = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for module, targets in graph.items()
        for target in targets
        if layer(target) > layer(module) and (module, target) not in ALLOWED
    ]
    assert upward == []


def test_only_the_families_reach_into_a_model_implementation(graph):
    """Train, merge, chat, eval, profile, the UI and the data checks get everything model-specific through
    `qwenvl_cli.families`, never from `qwenvl_cli.model` (Qwen-VL v1's native implementation)."""
    reaching = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if not module.startswith(("model", "families"))
        for target in targets
        if target.startswith("model") and (module, target) not in ALLOWED
    )
    assert reaching == []


def test_there_is_no_import_cycle(graph):
    """Between modules of different packages (a package's modules may share helpers both ways only inside
    it is not allowed either): a depth-first search finds no back edge."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target] if target in trail else [module, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_relative_lazy_and_absolute_imports(tmp_path):
    """The import reader itself: a lazy relative import inside a function and an absolute one both count."""
    probe = PACKAGE / "train" / "runner.py"
    found = imports(probe)
    assert {"families", "train.trainer", "train.options"} <= found
    worker = imports(PACKAGE / "profile_worker.py")  # absolute `from qwenvl_cli.train.runner import …` in a function
    assert "train.runner" in worker
    assert imports(PACKAGE / "__init__.py") == {"model.auto"}  # `from .model import auto` in the package root
    assert "errors" in imports(PACKAGE / "chat.py")  # `from .errors import …` in a top-level module


def test_a_folder_is_recognised_by_its_model_type(tmp_path, models):
    """family_for: Qwen-VL by model_type "qwen", Qwen2-VL/2.5-VL/3-VL by theirs; Qwen3-VL MoE named and
    refused; anything else refused with the supported types; a missing folder or config named."""
    import json

    from qwenvl_cli.errors import QwenvlError
    from qwenvl_cli.families import family_for

    assert family_for(models / "tiny").name == "qwen-vl"
    for model_type, name in (("qwen2_vl", "qwen2-vl"), ("qwen2_5_vl", "qwen2.5-vl"), ("qwen3_vl", "qwen3-vl")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}), "utf-8")
        assert family_for(folder).name == name
    for model_type, title in (("qwen3_vl_moe", "Qwen3-VL MoE"), ("llama", None)):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}), "utf-8")
        with pytest.raises(QwenvlError) as raised:
            family_for(folder)
        assert (title or "which qwenvl does not train or load") in raised.value.message
        assert "'qwen' (Qwen-VL)" in raised.value.fix
    with pytest.raises(QwenvlError, match=r"model folder .*nowhere does not exist"):
        family_for(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", "utf-8")
    with pytest.raises(QwenvlError, match="is not a JSON object"):
        family_for(tmp_path / "broken")
