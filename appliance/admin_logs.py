"""`GET /admin/logs`: the dashboard's log view reads the log ring (`appliance.log_ring`) here, behind the admin key
or the dashboard's session cookie, like the stats routes."""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, get
from litestar.params import FromQuery

from appliance.errors import APIError
from appliance.log_ring import LEVELS, RING, RING_LINES, RingHandler, secret_values
from ui.session import SELF_AUTHENTICATED, require_admin_session

LOGS_PATH = "/admin/logs"


def attach_ring(config) -> None:
    """Feeds the ring from this process's logging (once) and teaches it the config's secrets."""
    root = logging.getLogger()
    if not any(isinstance(h, RingHandler) for h in root.handlers):
        root.addHandler(RingHandler(RING))
    RING.remember_secrets(secret_values(msgspec.to_builtins(config), config.redacted()))


@get(LOGS_PATH, guards=[require_admin_session], opt={SELF_AUTHENTICATED: True}, sync_to_thread=False)
def admin_logs(request: Request, after: FromQuery[int] = 0, level: FromQuery[str] = "debug",
               limit: FromQuery[int] = 500) -> dict:
    """The lines after seq `after` at `level` or above, at most the last `limit`, and `last`: the seq to pass as
    `after` next."""
    if level not in LEVELS:
        raise APIError(400, f"level must be one of {', '.join(LEVELS)}", param="level")
    if not 1 <= limit <= RING_LINES:
        raise APIError(400, f"limit must be between 1 and {RING_LINES}", param="limit")
    config = request.app.state.supervisor.config
    if request.app.state.get("logs_config") is not config:  # a reload may have brought new keys
        attach_ring(config)
        request.app.state.logs_config = config
    return RING.read(after, level, limit)


ROUTES = [admin_logs]
