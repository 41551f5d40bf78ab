"""Loading a model's tokenizer and rendering chat templates.

Templates render through transformers' `apply_chat_template`, which compiles them in jinja2's
`ImmutableSandboxedEnvironment`: a template from a model folder cannot reach Python internals or mutate our objects.
A request's extra template variables (`template_kwargs`, e.g. `enable_thinking`) reach the template only: the names
that steer `apply_chat_template` itself (`RESERVED_TEMPLATE_KWARGS`) are refused.

The class `AutoTokenizer` picks for a model folder is remembered (`tokenizer_classes.json` in kvbox's cache folder,
keyed by the folder's config files and transformers' version): deciding it imports the model's config class, and
with it transformers' model-loading machinery, seconds of a server's start-up on some installs. A later start with
the same files loads that class directly.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cache_dir import cache_root
from engine.models.builtin import resolve_model_source
from engine.sampling_params import InvalidParameterError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
# apply_chat_template's own arguments, and the variables it sets: a request's template kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "bos_token", "eos_token",
    "unk_token", "pad_token", "raise_exception", "strftime_now",
})
_IMPORT_LOCK = threading.Lock()
_CLASS_CACHE_LOCK = threading.Lock()
# What AutoTokenizer's choice of class reads besides the folder's path: the model and tokenizer configs, and
# tokenizer.json's pre-tokenizer (by size and modification time: it is megabytes).
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json")
_MAX_REMEMBERED = 256
log = logging.getLogger(__name__)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, of a GGUF file (transformers rebuilds a fast tokenizer and the chat template
    from its tokenizer.* metadata) or of a built-in model (`builtin:NAME`)."""
    # Imported here: transformers takes seconds to import, and `kvbox serve` starts its engines meanwhile. Models
    # load in parallel threads, and transformers' lazy module is not safe to import from two threads at once.
    with _IMPORT_LOCK:
        from engine.models.gguf import is_gguf  # it imports torch, which the API server need not wait for

    source = resolve_model_source(path)
    # A local folder or file must not reach for the hub: transformers may ask it about the model (on a host
    # without network that waits for a connection timeout).
    local = Path(source).exists()
    if is_gguf(source):
        tokenizer = _auto_tokenizer().from_pretrained(Path(source).parent, gguf_file=Path(source).name,
                                                      trust_remote_code=False, local_files_only=local)
    else:
        key = _folder_key(Path(source)) if Path(source).is_dir() else None
        cls = _remembered_class(key)
        if cls is not None:
            # What AutoTokenizer hands the class it picked (never remote code: only transformers' classes are kept).
            tokenizer = cls.from_pretrained(source, local_files_only=True, _from_auto=True)
        else:
            tokenizer = _auto_tokenizer().from_pretrained(source, trust_remote_code=False, local_files_only=local)
            _remember_class(key, type(tokenizer))
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: kvbox needs a fast (tokenizer.json) tokenizer for incremental detokenization")
    return tokenizer


def _auto_tokenizer():
    with _IMPORT_LOCK:
        from transformers import AutoTokenizer
    return AutoTokenizer


def _class_cache_file() -> Path | None:
    root = cache_root()
    return None if root is None else root / "tokenizer_classes.json"


def _folder_key(folder: Path) -> str | None:
    """A digest of what decides the folder's tokenizer class; None where the folder has no tokenizer.json (the
    class then converts a slow tokenizer's files, which AutoTokenizer alone should decide)."""
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        return None
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path: no version to key on
        return None
    stat = tokenizer_json.stat()
    digest = hashlib.sha256(f"{folder.resolve()}\n{version}\n{stat.st_size} {stat.st_mtime_ns}".encode())
    for name in _CONFIG_FILES:
        path = folder / name
        digest.update(f"\n{name}\n".encode() + (path.read_bytes() if path.is_file() else b"-"))
    return digest.hexdigest()


def _read_class_cache() -> dict[str, str]:
    path = _class_cache_file()
    try:
        entries = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _remembered_class(key: str | None):
    """The tokenizer class AutoTokenizer chose for these files before, or None."""
    name = _read_class_cache().get(key) if key else None
    if not isinstance(name, str) or not name.startswith("transformers.") or ":" not in name:
        return None  # only transformers' own classes: a cache file must not choose code to run
    module, _, qualname = name.partition(":")
    try:
        with _IMPORT_LOCK:
            return getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        return None


def _remember_class(key: str | None, cls: type) -> None:
    path = _class_cache_file()
    if key is None or path is None or not cls.__module__.startswith("transformers."):
        return
    with _CLASS_CACHE_LOCK:
        entries = _read_class_cache()
        entries.pop(key, None)
        entries[key] = f"{cls.__module__}:{cls.__qualname__}"
        entries = dict(list(entries.items())[-_MAX_REMEMBERED:])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(entries))
            tmp.replace(path)
        except OSError as exc:  # a read-only home: every start decides the class anew
            log.debug("cannot remember the tokenizer class in %s: %s", path, exc)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message], chat_template: str | None = None,
                add_generation_prompt: bool = True, *, continue_final_message: bool = False,
                documents: list[dict[str, str]] | None = None, tools: list[dict] | None = None,
                template_kwargs: dict | None = None) -> str:
    """`tools` (OpenAI's function definitions), `documents` and `template_kwargs` (e.g. enable_thinking) reach the
    template as variables; a request's kwargs may not override the arguments this function sets."""
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError("the model has no chat template; configure one or use completions")
    for name in sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or ())):
        raise InvalidParameterError(f"chat_template_kwargs.{name}", f"{name} is not a template variable a request "
                                                                    f"may set")
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, documents=documents,
                                         tools=tools, **(template_kwargs or {}))
