"""qwenvl's native Qwen-VL in transformers' Auto classes, under the official `model_type` "qwen".

After `import qwenvl_cli`, `AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer` load an official Qwen-VL
or Qwen-VL-Chat folder with qwenvl's classes (`QwenVLConfig`, `QwenVLForCausalLM`, `QWenTokenizer`), without
`trust_remote_code`; so do libraries built on them (PEFT's `AutoPeftModelForCausalLM`, TRL, eval harnesses).
A folder's `auto_map` (pointers at the upstream remote code) is then not needed: transformers asks for
remote code only when no local class is registered for the model type, and prefers a registered one even
with `trust_remote_code=True`.

Registration waits for transformers. Importing qwenvl_cli must stay cheap (`qwenvl --help` never loads
torch), and transformers' auto modules take seconds to import. `install()` puts a finder on `sys.meta_path`
that lets the other finders find and load these three modules as usual, and registers qwenvl's class right
after each has run for the first time:

    transformers.models.auto.configuration_auto  →  AutoConfig            "qwen" → QwenVLConfig
    transformers.models.auto.modeling_auto       →  AutoModelForCausalLM  QwenVLConfig → QwenVLForCausalLM
    transformers.models.auto.tokenization_auto   →  AutoTokenizer         QwenVLConfig → QWenTokenizer

so the classes are there whatever the first use of transformers is (`from transformers import AutoModel…`,
PEFT, a pipeline). Modules already imported when qwenvl_cli is are served at once. An entry that already
exists (the user's own registration, or a future transformers' "qwen") is left as it is, and registering
the same classes again, by qwenvl or by the user, changes nothing and raises nothing.
"""

from __future__ import annotations

import sys
import warnings

MODEL_TYPE = "qwen"
CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
TOKENIZATION_AUTO = "transformers.models.auto.tokenization_auto"


def register_config() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    from .config import QwenVLConfig

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, QwenVLConfig)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    from .config import QwenVLConfig
    from .modeling import QwenVLForCausalLM

    if QwenVLConfig not in MODEL_FOR_CAUSAL_LM_MAPPING:
        AutoModelForCausalLM.register(QwenVLConfig, QwenVLForCausalLM)


def register_tokenizer() -> None:
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING, AutoTokenizer

    from .config import QwenVLConfig
    from .hf_tokenizer import QWenTokenizer

    if QwenVLConfig not in TOKENIZER_MAPPING:
        AutoTokenizer.register(QwenVLConfig, tokenizer_class=QWenTokenizer)


REGISTRATIONS = {CONFIG_AUTO: register_config, MODELING_AUTO: register_model, TOKENIZATION_AUTO: register_tokenizer}


def register() -> None:
    """Register everything now (imports transformers and torch; `install` does it when transformers is used)."""
    for registration in REGISTRATIONS.values():
        registration()


def _run(registration) -> None:
    # A failure here must not break the user's import of transformers: it only means that the Auto classes
    # do not know Qwen-VL (the error they then raise names the model type).
    try:
        registration()
    except Exception as exc:
        warnings.warn(
            f"qwenvl could not register Qwen-VL with transformers' Auto classes ({type(exc).__name__}: {exc})",
            stacklevel=2,
        )


class RegisterAfterImport:
    """A `sys.meta_path` finder that finds nothing itself: for the modules of `REGISTRATIONS` it takes the spec
    the finders after it give, with its loader wrapped so that the registration runs once the module has
    executed."""

    qwenvl_auto_registration = True  # the mark `install` looks for (the class itself may be reloaded)

    def find_spec(self, name, path=None, target=None):
        registration = REGISTRATIONS.get(name)
        if registration is None:
            return None
        after = sys.meta_path[sys.meta_path.index(self) + 1 :] if self in sys.meta_path else []
        for finder in after:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if hasattr(spec.loader, "exec_module"):
            spec.loader = RegisteringLoader(spec.loader, registration)
        return spec


class RegisteringLoader:
    """The module's own loader (every other attribute is its), registering after `exec_module`."""

    def __init__(self, loader, registration):
        self.loader = loader
        self.registration = registration

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None  # None: the default module

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _run(self.registration)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def install() -> None:
    """Register with transformers when it is first used (at once for what is already imported). Idempotent."""
    if not any(getattr(finder, "qwenvl_auto_registration", False) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterImport())
    for name, registration in REGISTRATIONS.items():
        if name in sys.modules:
            _run(registration)
