"""Loading a model's tokenizer and rendering chat templates.

Templates render through transformers' `apply_chat_template`, which compiles them in jinja2's
`ImmutableSandboxedEnvironment`: a template from a model folder cannot reach Python internals or mutate our objects.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

Message = dict[str, str]


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: kvbox needs a fast (tokenizer.json) tokenizer for incremental detokenization")
    return tokenizer


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message], chat_template: str | None = None,
                add_generation_prompt: bool = True) -> str:
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError("the model has no chat template; configure one or use completions")
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
