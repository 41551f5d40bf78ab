"""Loading a model's tokenizer and rendering chat templates.

Templates render through transformers' `apply_chat_template`, which compiles them in jinja2's
`ImmutableSandboxedEnvironment`: a template from a model folder cannot reach Python internals or mutate our objects.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from engine.models.builtin import resolve_model_source
from engine.models.gguf import is_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
_IMPORT_LOCK = threading.Lock()


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, of a GGUF file (transformers rebuilds a fast tokenizer and the chat template
    from its tokenizer.* metadata) or of a built-in model (`builtin:NAME`)."""
    # Imported here: transformers takes seconds to import, and `kvbox serve` starts its engines meanwhile. Models
    # load in parallel threads, and transformers' lazy module is not safe to import from two threads at once.
    with _IMPORT_LOCK:
        from transformers import AutoTokenizer

    source = resolve_model_source(path)
    # A local folder or file must not reach for the hub: transformers may ask it about the model (on a host
    # without network that waits for a connection timeout).
    local = Path(source).exists()
    if is_gguf(source):
        tokenizer = AutoTokenizer.from_pretrained(Path(source).parent, gguf_file=Path(source).name,
                                                  trust_remote_code=False, local_files_only=local)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, local_files_only=local)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: kvbox needs a fast (tokenizer.json) tokenizer for incremental detokenization")
    return tokenizer


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message], chat_template: str | None = None,
                add_generation_prompt: bool = True, tools: list[dict] | None = None,
                template_kwargs: dict | None = None) -> str:
    """`tools` (OpenAI's function definitions) and `template_kwargs` (e.g. enable_thinking) reach the template as
    variables; neither may override the arguments this function sets."""
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError("the model has no chat template; configure one or use completions")
    extra = dict(template_kwargs or {})
    clashes = sorted(set(extra) & {"messages", "conversation", "chat_template", "tokenize", "tools",
                                   "add_generation_prompt", "return_dict", "tokenizer_kwargs"})
    if clashes:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(clashes)}")
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, tools=tools, **extra)
