"""The dashboard's request table: every API request that reached an engine while it runs, and the last
`MAX_FINISHED` that ended (with the ones refused before reaching one: a 400, 429 or 503 of a generation route), kept
in bounded structures.

A `RequestRecord` is fed by the request path (`Generation`: its outputs and its end), by the engine's steps (each
prompt's queue, prefill and decode times, `EngineCoreOutput.timing`) and by the HTTP layer (the status the client
got, `RequestLog.on_http`). Prompt text is kept only with `ui.show_prompts` (cut to `PROMPT_CHARS`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from engine.contract import RequestTiming

MAX_FINISHED = 200
MAX_INFLIGHT_ROWS = 200  # the oldest in-flight requests shown; the count covers them all
PROMPT_CHARS = 300
_ROUTES = ("/v1/",)  # refusals of these paths are listed too


class RequestRecord:
    __slots__ = ("id", "model", "adapter", "state", "arrival", "created", "prompt_tokens", "output_tokens",
                 "first_token", "finished_at", "finish_reasons", "status", "timing", "prompt", "_log", "_row")

    def __init__(self, log: RequestLog, request_id: str, model: str | None, adapter: str | None, now: float,
                 wall: float, prompt: str | None = None):
        self._log, self.id, self.model, self.adapter = log, request_id, model, adapter
        self.state = "waiting"  # -> generating -> finished | aborted | failed | refused
        self.arrival, self.created = now, wall
        self.prompt_tokens = self.output_tokens = 0
        self.first_token: float | None = None
        self.finished_at: float | None = None
        self.finish_reasons: list[str] = []
        self.status: int | None = None
        self.timing: RequestTiming | None = None
        self.prompt = prompt
        self._row: dict | None = None

    def on_first_token(self, now: float, num_prompt_tokens: int) -> None:
        if self.first_token is None:
            self.first_token, self.state = now, "generating"
        self.prompt_tokens += num_prompt_tokens

    def on_tokens(self, num_new: int) -> None:
        self.output_tokens += num_new

    def on_timing(self, timing: RequestTiming) -> None:
        """A prompt's engine phases; with several prompts, the slowest one's."""
        if self.timing is None or timing.queued_s + timing.prefill_s + timing.decode_s > \
                self.timing.queued_s + self.timing.prefill_s + self.timing.decode_s:
            self.timing = timing

    def finish(self, now: float, reasons: list[str], aborted: bool) -> None:
        self.finished_at, self.finish_reasons = now, reasons
        self.state = "failed" if "error" in reasons else "aborted" if aborted else "finished"
        self._log.finished(self)

    @property
    def finish_reason(self) -> str | None:
        return ",".join(sorted(set(self.finish_reasons))) or None

    def row(self, now: float) -> dict[str, Any]:
        if self._row is not None:
            return self._row
        end = self.finished_at
        timing = self.timing
        row = {"id": self.id, "model": self.model, "adapter": self.adapter, "state": self.state,
               "created": self.created, "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
               "queue_s": timing.queued_s if timing else None, "prefill_s": timing.prefill_s if timing else None,
               "decode_s": timing.decode_s if timing else None,
               "ttft_s": self.first_token - self.arrival if self.first_token is not None else None,
               "e2e_s": (end if end is not None else now) - self.arrival, "finish_reason": self.finish_reason,
               "status": self.status}
        if self.prompt is not None:
            row["prompt"] = self.prompt
        if end is not None and self.status is not None:
            self._row = row  # final: computed once
        return row


class RequestLog:
    def __init__(self, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 on_finished: Callable[[RequestRecord], None] | None = None):
        self.clock, self.wall_clock = clock, wall_clock
        self.inflight: dict[str, RequestRecord] = {}
        self.recent: OrderedDict[str, RequestRecord] = OrderedDict()  # ended, oldest first
        self._on_finished = on_finished

    def begin(self, request_id: str, model: str, adapter: str | None, prompt: str | None) -> RequestRecord:
        """A request reaches an engine; `prompt`, its text, is kept (cut) only when given."""
        text = prompt[:PROMPT_CHARS] if prompt is not None else None
        record = RequestRecord(self, request_id, model, adapter, self.clock(), self.wall_clock(), text)
        self.inflight[request_id] = record
        return record

    def finished(self, record: RequestRecord) -> None:
        self.inflight.pop(record.id, None)
        self._keep(record)
        if self._on_finished is not None:
            self._on_finished(record)

    def on_timing(self, parent_id: str, timing: RequestTiming) -> None:
        """An engine request `<request id>-<prompt index>` finished with these phases."""
        record = self.inflight.get(parent_id.rpartition("-")[0])
        if record is not None:
            record.on_timing(timing)

    def on_http(self, request_id: str, path: str, status: int, fields: dict) -> None:
        """The HTTP response ended: its status goes on the request's row; a generation route's refusal (it never
        reached an engine) gets a row of its own."""
        record = self.recent.get(request_id) or self.inflight.get(request_id)
        if record is not None:
            record.status, record._row = status, None
        elif status >= 400 and path.startswith(_ROUTES):
            now = self.clock()
            record = RequestRecord(self, request_id, fields.get("model"), fields.get("adapter"), now,
                                   self.wall_clock())
            record.status, record.state, record.finished_at = status, "refused", now
            self._keep(record)

    def _keep(self, record: RequestRecord) -> None:
        self.recent[record.id] = record
        self.recent.move_to_end(record.id)
        while len(self.recent) > MAX_FINISHED:
            self.recent.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        inflight = list(self.inflight.values())[:MAX_INFLIGHT_ROWS]
        return {"num_inflight": len(self.inflight), "max_finished": MAX_FINISHED,
                "inflight": [r.row(now) for r in inflight],
                "finished": [r.row(now) for r in reversed(self.recent.values())]}  # newest first
