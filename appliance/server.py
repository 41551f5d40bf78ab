"""`kvbox serve -c FILE` (or `python -m appliance.server FILE`): uvicorn serving the app, with kvbox's own signals.

SIGTERM or SIGINT drains: new requests get 503, running ones have `server.drain_timeout_s` to finish, then the
engines stop and the process exits 0. A second signal stops at once. SIGHUP (or POST /admin/reload) reloads the config file: models added,
removed or changed are started, stopped or restarted, and keys and limits follow; an invalid file is logged and
ignored. Listening address, body size limit, CORS, metrics and UI settings take effect at the next start.

With `--node-rank R` above 0 (several machines, see appliance.node) it serves no API: it runs that node's ranks
until SIGTERM or SIGINT.

Exit codes: 0 after a drain, 1 if every model failed to start, 2 for an unusable config file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

from dataclasses import dataclass

import msgspec
import uvicorn

from appliance.app import create_app
from appliance.config import AppConfig, ConfigError, load_config
from appliance.http_protocol import protocol_class
from appliance.logs import configure_logging
from appliance.node import NodeLayout, serve_node
from appliance.version import kvbox_version
from appliance.supervisor import ModelStatus, Supervisor

logger = logging.getLogger("kvbox.server")
# Once drained, connections still open (idle keep-alives, streams ending) get this long before uvicorn drops them.
GRACEFUL_SHUTDOWN_S = 5


@dataclass(frozen=True)
class ServeOptions:
    """Command-line overrides of the file's keys; they hold across reloads too."""

    host: str | None = None
    port: int | None = None
    api_key_env: str | None = None  # the name of an environment variable holding the one API key
    log_level: str = "info"
    log_format: str = "text"
    nodes: NodeLayout = NodeLayout()  # several machines (appliance.node)

    def load(self, config_path: str) -> AppConfig:
        config = load_config(config_path, (self.nodes.nnodes, self.nodes.node_rank))
        server = config.server
        changes = {k: v for k, v in (("host", self.host), ("port", self.port)) if v is not None}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError("--api-key-env", "", f"environment variable {self.api_key_env} is not set")
            changes["api_keys"] = (key,)
        return msgspec.structs.replace(config, server=msgspec.structs.replace(server, **changes))


def serve_main(config_path: str, options: ServeOptions | None = None) -> int:
    options = options or ServeOptions()
    configure_logging(options.log_level, options.log_format)
    logger.info("kvbox %s serve %s: starting", kvbox_version(), config_path)
    try:
        config = options.load(config_path)
    except ConfigError as e:
        print(f"kvbox: {e}", file=sys.stderr)
        return 2
    if options.nodes.node_rank > 0:
        return serve_node(config, options.nodes)
    return asyncio.run(_serve(config_path, config, options))


async def _serve(config_path: str, config: AppConfig, options: ServeOptions) -> int:
    supervisor = Supervisor(config, nodes=options.nodes if options.nodes.nnodes > 1 else None)
    app = create_app(config, supervisor)
    # uvicorn logs through the root logger's format (log_config=None); kvbox's access log replaces uvicorn's.
    server = _Server(uvicorn.Config(app, host=config.server.host, port=config.server.port, log_config=None,
                                    access_log=False, lifespan="on", reload=False,
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **connection_options(config)))
    lifecycle = _Lifecycle(server, supervisor, config_path, options)
    app.state.reload = lifecycle.reload_now
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lifecycle.stop)
    loop.add_signal_handler(signal.SIGINT, lifecycle.stop)
    loop.add_signal_handler(signal.SIGHUP, lifecycle.reload)
    announcing = asyncio.create_task(lifecycle.announce_when_ready(app))
    try:
        await server.serve()
    finally:
        announcing.cancel()
    return lifecycle.exit_code


def connection_options(config: AppConfig) -> dict:
    """uvicorn's options for client connections: the deadlines on slow clients (appliance.http_protocol),
    keep-alive."""
    return {"http": protocol_class(config.server.request_read_timeout_s, config.server.write_stall_timeout_s),
            "timeout_keep_alive": config.server.keep_alive_timeout_s}


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own handlers would stop at the first SIGTERM, before draining; `_Lifecycle` has the signals.
        yield


class _Lifecycle:
    def __init__(self, server: uvicorn.Server, supervisor: Supervisor, config_path: str, options: ServeOptions):
        self.server = server
        self.supervisor = supervisor
        self.config_path = config_path
        self.options = options
        self.exit_code = 0
        self._draining: asyncio.Task | None = None
        self._reloading: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()

    def stop(self) -> None:
        if self._draining is not None:
            logger.warning("second stop signal: exiting without waiting for requests")
            self.server.force_exit = self.server.should_exit = True
            return
        self._draining = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        timeout = self.supervisor.config.server.drain_timeout_s
        logger.info("draining: refusing new requests, giving running ones up to %.0f s", timeout)
        try:
            await self.supervisor.drain(timeout)
        finally:
            self.server.should_exit = True

    def reload(self) -> None:
        """SIGHUP: reload in the background; problems are logged and the running config stays."""
        if self._draining is not None or self._reload_lock.locked():
            logger.warning("SIGHUP ignored: a drain or another reload is in progress")
            return
        self._reloading = asyncio.create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            await self.reload_now()
        except ConfigError as e:
            logger.error("reload refused, the running config stays: %s", e)
        except Exception:
            logger.exception("reload failed")

    async def reload_now(self) -> dict[str, list[str]]:
        """Reloads the config file (POST /admin/reload and SIGHUP); raises ConfigError for an invalid file."""
        async with self._reload_lock:
            config = await asyncio.to_thread(self.options.load, self.config_path)
            old = self.supervisor.config
            if (config.server.host, config.server.port, config.server.max_body_bytes, config.server.cors,
                    config.metrics, config.ui) != (old.server.host, old.server.port, old.server.max_body_bytes,
                                                   old.server.cors, old.metrics, old.ui):
                logger.warning("reload: listening address, max_body_bytes, cors, metrics and ui apply at the next "
                               "start")
            changes = await self.supervisor.reload(config)
            logger.info("reloaded %s: %s", self.config_path, changes)
            return changes

    async def announce_when_ready(self, app) -> None:
        while not self.server.started:
            await asyncio.sleep(0.05)
        try:
            await app.state.startup
        except Exception:
            logger.exception("starting the models failed")
        # Start-up leaves hundreds of thousands of objects (torch, transformers, tokenizers) that live as long as
        # the process; frozen, the collector stops rescanning them, which took 100 ms and more a full collection
        # under streaming load, every stream paused meanwhile.
        gc.freeze()
        models = list(self.supervisor.models.values())
        if not any(m.status in (ModelStatus.READY, ModelStatus.SLEEPING) for m in models):  # on_demand: sleeping
            logger.error("no model could start; exiting")
            self.exit_code = 1
            self.server.should_exit = True
            return
        with contextlib.suppress(OSError):  # a full disk or a closed terminal must not stop the serving
            print(_banner(self.supervisor.config, self._address()), flush=True)
        for model in models:
            if model.status not in (ModelStatus.READY, ModelStatus.SLEEPING):
                logger.error("model %r is %s: %s", model.name, model.status.value,
                             model.errors[-1][1] if model.errors else "no error recorded")

    def _address(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # listening everywhere: this machine's own address works for the examples
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _banner(config: AppConfig, address: str) -> str:
    base = f"http://{address}"
    auth = ' -H "Authorization: Bearer $KVBOX_API_KEY"' if config.server.api_keys else ""
    model = config.models[0].name
    lines = [f"kvbox is ready: {', '.join(m.name for m in config.models)}",
             f"  API:       {base}/v1"]
    if config.ui.enabled:
        lines.append(f"  dashboard: {base}{config.ui.path}")
    if config.metrics.enabled:
        lines.append(f"  metrics:   {base}{config.metrics.path}")
    lines.append(f"  try:       curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                 f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")
    key = 'os.environ["KVBOX_API_KEY"]' if config.server.api_keys else '"none"'
    lines.append(f"  python:    from openai import OpenAI; import os; print(OpenAI(base_url=\"{base}/v1\", api_key={key})"
                 f".chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": "
                 f"\"Hello!\"}}]).choices[0].message.content)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m appliance.server CONFIG.yaml")
    sys.exit(serve_main(sys.argv[1]))
