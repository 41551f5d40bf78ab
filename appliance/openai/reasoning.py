"""`reasoning_parser`: the model's `<think>...</think>` text -> `reasoning_content`, the rest -> `content`.

deepseek_r1: the template opens `<think>` itself, so the reply is reasoning until `</think>` (all of it, when the
reply never closes it). qwen3: reasoning only between `<think>` and `</think>` (with enable_thinking false the reply
has none). `ReasoningStream` splits a stream the same way, holding back a suffix that may be half a tag.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


def split_reasoning(parser: str, text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a whole reply."""
    body = text.lstrip()
    opened = body.startswith(START)
    if opened:
        body = body[len(START):]
    if END in body:
        reasoning, content = body.split(END, 1)
        return reasoning.strip("\n"), content.lstrip("\n")
    if parser == "deepseek_r1" or opened:
        return body.strip("\n"), ""
    return None, text


class ReasoningStream:
    def __init__(self, parser: str):
        self.parser = parser
        self._seen = ""  # the reply's text before the decision (deepseek_r1 decides at once)
        self._thinking: bool | None = True if parser == "deepseek_r1" else None
        self._held = ""
        self._after_end = False  # newlines right after </think> are the template's, not content

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of text."""
        if self._thinking is None:
            self._seen += delta
            stripped = self._seen.lstrip()
            if not final and len(stripped) < len(START) and START.startswith(stripped):
                return "", ""  # may still open with <think>
            self._thinking = stripped.startswith(START)
            delta = stripped[len(START):] if self._thinking else self._seen
        if not self._thinking:
            return "", self._content(delta)
        text = (self._held + delta).replace(START, "", 1) if not self._held else self._held + delta
        if END in text:
            reasoning, content = text.split(END, 1)
            self._thinking, self._held, self._after_end = False, "", True
            return reasoning, self._content(content)
        keep = 0 if final else _partial_suffix(text, END)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], ""


    def _content(self, delta: str) -> str:
        if self._after_end:
            delta = delta.lstrip("\n")
            self._after_end = not delta
        return delta


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
