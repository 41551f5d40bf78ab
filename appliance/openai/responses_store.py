"""The Responses API's memory: responses kept for `previous_response_id` and `GET /v1/responses/{id}`, each with
the conversation it ended (chat messages, its own reply last; instructions are not part of it, as OpenAI does not
carry them over). Bounded by `server.responses_store_max` (read at each store, so a reload applies), least recently
used dropped first; in this process's memory only, so a restart forgets them all."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from appliance.openai.responses_protocol import ResponseObject


class Stored(NamedTuple):
    response: ResponseObject
    conversation: list[dict]


class ResponseStore:
    def __init__(self):
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, stored: Stored, capacity: int) -> None:
        self._items[stored.response.id] = stored
        self._items.move_to_end(stored.response.id)
        while len(self._items) > capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None
