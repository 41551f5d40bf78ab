"""`kvbox chat MODEL`: a terminal chat against a running kvbox server, streaming the reply as it is generated."""

from __future__ import annotations

import json
import os
import sys

import httpx


def stream_reply(client: httpx.Client, model: str, messages: list[dict], max_tokens: int,
                 temperature: float) -> str:
    """Sends the conversation, prints the reply's tokens as they arrive, returns the whole reply."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": temperature}
    reply = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(_error_message(response))
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", "the server reported an error"))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                reply.append(text)
                print(text, end="", flush=True)
    print()
    return "".join(reply)


def chat_main(model: str, url: str, api_key: str | None, system: str | None, max_tokens: int,
              temperature: float) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    messages = [{"role": "system", "content": system}] if system else []
    print(f"kvbox chat with {model!r} at {url} — an empty line or Ctrl-D ends it.")
    with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10.0, read=None)) as client:
        while True:
            try:
                user = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not user:
                return 0
            messages.append({"role": "user", "content": user})
            print(f"{model}> ", end="", flush=True)
            try:
                messages.append({"role": "assistant",
                                 "content": stream_reply(client, model, messages, max_tokens, temperature)})
            except (RuntimeError, httpx.HTTPError) as e:
                messages.pop()
                print(f"\nerror: {e}", file=sys.stderr)


def default_api_key() -> str | None:
    return os.environ.get("KVBOX_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _error_message(response: httpx.Response) -> str:
    try:
        return f"{response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"
