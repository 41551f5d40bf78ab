"""Loading a model's tokenizer and rendering chat templates.

Templates render through transformers' `apply_chat_template`, which compiles them in jinja2's
`ImmutableSandboxedEnvironment`: a template from a model folder cannot reach Python internals or mutate our objects.
A request's extra template variables (`template_kwargs`, e.g. `enable_thinking`) reach the template only: the names
that steer `apply_chat_template` itself (`RESERVED_TEMPLATE_KWARGS`) are refused.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

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


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, of a GGUF file (transformers rebuilds a fast tokenizer and the chat template
    from its tokenizer.* metadata) or of a built-in model (`builtin:NAME`)."""
    # Imported here: transformers takes seconds to import, and `kvbox serve` starts its engines meanwhile. Models
    # load in parallel threads, and transformers' lazy module is not safe to import from two threads at once.
    with _IMPORT_LOCK:
        from transformers import AutoTokenizer

        from engine.models.gguf import is_gguf  # it imports torch, which the API server need not wait for

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
