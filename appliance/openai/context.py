"""What the API's handlers share, one `ServingContext` per app: the models (the supervisor), the admission counts,
the metrics, the dashboard's statistics and the Responses API's stored responses. Handlers get it from
`serving_context(request)` and hand on what each step needs, so that no step looks anything up in `app.state`
behind its caller's back."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from litestar import Request

from appliance.config import ServerSpec
from appliance.errors import RETRY_QUEUE_FULL_S, APIError
from appliance.fleet import Fleet
from appliance.metrics import Metrics
from appliance.openai.responses_store import ResponseStore
from appliance.request_ids import HEADER
from appliance.stats import StatsHub
from appliance.supervisor import ModelRuntime, Supervisor


class Admission:
    """Counts each model's admitted engine requests, from admission to their end, and the API requests' ids.

    A model takes at most `queue_cap + scheduler.max_num_seqs x replicas` engine requests at once (running plus
    waiting; a completions request with several prompts counts one per prompt). Beyond that a request gets 429 with
    Retry-After, before it costs the engine anything. Counted here rather than read from the replicas because a
    request reaches its replica only after admission has returned: many requests admitted in one event-loop turn
    would all see the old count.

    An id already running is refused (409): its engine requests' ids would collide, and its log lines would mix.
    """

    def __init__(self):
        self._counts: Counter[str] = Counter()  # model -> engine requests admitted
        self._running: Counter[str] = Counter()  # API request id -> its engine requests not ended yet

    def acquire(self, model: ModelRuntime, request_id: str, num: int) -> None:
        if request_id in self._running:
            raise APIError(409, f"a request with id {request_id!r} is running; ids must be unique while their "
                                f"requests run", param=HEADER, code="duplicate_request_id")
        cap = model.spec.queue_cap + model.spec.scheduler.max_num_seqs * len(model.replicas)
        # A request larger than the cap (an embeddings batch) is admitted alone, when nothing else is queued.
        if self._counts[model.name] and self._counts[model.name] + num > cap:
            raise APIError(429, f"model {model.name!r} has {self._counts[model.name]} requests running or queued, "
                                f"its limit; retry later", code="queue_full", retry_after=RETRY_QUEUE_FULL_S)
        self._counts[model.name] += num
        self._running[request_id] += num

    def release(self, model_name: str, request_id: str) -> None:
        """One of the request's engine requests has ended."""
        self._counts[model_name] -= 1
        self._running[request_id] -= 1
        if not self._running[request_id]:
            del self._running[request_id]


@dataclass
class ServingContext:
    supervisor: Supervisor
    metrics: Metrics
    stats: StatsHub | None = None  # with the dashboard only
    admission: Admission = field(default_factory=Admission)
    fleet: Fleet | None = None  # sleeping models and their wake; set by create_app
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses

    @property
    def server(self) -> ServerSpec:
        """The server's limits as of now: a reload replaces the config."""
        return self.supervisor.config.server


def serving_context(request: Request) -> ServingContext:
    return request.app.state.serving
