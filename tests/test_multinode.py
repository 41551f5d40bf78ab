"""Multi-node serving: two `kvbox serve` processes as two nodes (`--nnodes 2`), a tensor-parallel model with one rank
on each (on 127.0.0.1 also a pipeline-parallel one, a stage on each). Greedy outputs equal the single-rank engine's; a node that dies fails requests instead of hanging them, the
model answers 503 meanwhile, and serves again once the node's ranks rejoin. So does a node that is lost without
closing a connection (the rank heartbeat finds it): on 127.0.0.1 a node frozen whole (SIGSTOP), on two addresses a
network cut (its link down). Run twice: both nodes on 127.0.0.1, and node 1 in a network namespace of its own,
reached over a veth pair (two hosts, two addresses; needs root and iproute2, as CI has)."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import yaml

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ROOT, model_config, run_server, server_config, wait_for_model_error  # noqa: E402

from appliance import node  # noqa: E402
from appliance.cli import main as cli_main  # noqa: E402
from appliance.config import parse_config  # noqa: E402
from appliance.node import NodeLayout  # noqa: E402
from appliance import supervisor as supervisor_module  # noqa: E402
from appliance.inprocess import InProcessEngineClient  # noqa: E402
from appliance.supervisor import MAX_CRASHES, ModelRuntime, ModelStatus, Supervisor  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.distributed import parallel_state  # noqa: E402
from engine.distributed.nodes import node_ranks  # noqa: E402

pytest_plugins = ["helpers_server"]

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Once upon a time"]
NETNS, VETH, HOST_ADDR, NODE1_ADDR = "kvbox-node1", "kvbox-veth", "10.231.0.1", "10.231.0.2"
HEARTBEAT_S = 5  # server.rank_heartbeat_timeout_s


def test_ranks_are_laid_out_per_node_rank_0_first():
    assert [list(node_ranks(4, 2, r)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(node_ranks(3, 2, r)) for r in range(2)] == [[0, 1], [2]]
    assert [list(node_ranks(1, 2, r)) for r in range(2)] == [[0], []]  # a single-rank model stays on node 0


def test_ranks_wait_for_each_other_as_long_as_the_server_waits_for_a_silent_engine():
    """A step may take engine_hang_timeout_s; the ranks' collectives waited a fixed minute (a slow stage failed)."""
    config = parse_config(yaml.safe_dump({"server": {"engine_hang_timeout_s": 600}, "models": [
        {"name": "m", "source": "/", "device": "cpu", "parallelism": {"tensor": 2}}]}))
    worker = node._RankGroup(config, NodeLayout(nnodes=2, node_rank=1), config.models[0], 0, range(1, 2))
    assert worker.commands[0][-2] == "600.0"  # node 1's rank: `... COLLECTIVE_TIMEOUT_S HEARTBEAT_TIMEOUT_S`
    plans = []

    def factory(plan):
        plans.append(plan)
        raise RuntimeError("planned")

    with pytest.raises(RuntimeError, match="planned"):
        asyncio.run(Supervisor(config, factory).start_engines(ModelRuntime(config.models[0], model_path="/m")))
    assert plans[0].engine_config.collective_timeout_s == 600  # node 0's ranks, through the engine


def test_node_0_waits_for_an_absent_node_as_long_as_it_takes(tiny_model, tmp_path, monkeypatch):
    """A start that finds another node's ranks missing is no crash: the model stays restarting (503) past the crash
    budget, which used to mark it failed after about four minutes, and is ready once the node comes."""
    monkeypatch.setattr(parallel_state, "RENDEZVOUS_TIMEOUT_S", 0.5)  # each start waits this long for node 1
    monkeypatch.setattr(supervisor_module, "RANKS_RETRY_S", 0.05)
    port = _free_port()
    config_dict = server_config([model_config("llama", tiny_model("llama"), parallelism={"tensor": 2})])
    config_path = tmp_path / "node1.yaml"
    config_path.write_text(yaml.safe_dump(config_dict))
    config = parse_config(yaml.safe_dump(config_dict))

    async def scenario() -> None:
        supervisor = Supervisor(config, InProcessEngineClient, nodes=NodeLayout(2, 0, "127.0.0.1", port))
        model = ModelRuntime(config.models[0], model_path=config.models[0].source)
        await supervisor.start_engines(model)
        while model.restarts <= MAX_CRASHES + 1:
            assert model.status is ModelStatus.RESTARTING, list(model.errors)
            await asyncio.sleep(0.05)
        assert "other ranks reached the rendezvous" in model.errors[-1][1]
        with _node1(config_path, tmp_path / "node1.log", "127.0.0.1", port):
            deadline = time.monotonic() + 120
            while model.status is not ModelStatus.READY:
                assert time.monotonic() < deadline and model.status is ModelStatus.RESTARTING, list(model.errors)
                await asyncio.sleep(0.1)
            await supervisor.stop_engines(model, ModelStatus.STOPPED)

    asyncio.run(scenario())


def test_node_rank_must_be_below_nnodes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "-c", "kvbox.yaml", "--nnodes", "2", "--node-rank", "2"])
    assert exit_info.value.code == 2
    assert "--node-rank 2 is not below --nnodes 2" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _completions(server) -> list[str]:
    completion = server.client(timeout=120).completions.create(
        model="llama", prompt=PROMPTS, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    return [c.text for c in sorted(completion.choices, key=lambda c: c.index)]


@contextmanager
def _node1(config_path: Path, log_path: Path, master: str, port: int, prefix: tuple[str, ...] = ()):
    with open(log_path, "ab") as log:
        process = subprocess.Popen([*prefix, sys.executable, "-m", "appliance.cli", "serve", "-c", str(config_path),
                                    "--nnodes", "2", "--node-rank", "1", "--master-addr", master,
                                    "--master-port", str(port)],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # a prefix (ip netns exec) passes the signal on by exec'ing
            process.wait(30)


def _wait_ready(server, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while server.admin_models()["llama"]["status"] != "ready":
        assert time.monotonic() < deadline, "the model did not come back"
        time.sleep(0.5)


def _serve_on_two_nodes(tiny_model, tmp_path, master: str, cut, mend, prefix: tuple[str, ...] = (),
                        parallelism: dict | None = None) -> None:
    """`cut(node1)` loses node 1 without closing its connections, `mend(node1)` brings it back."""
    model_dir = tiny_model("llama")
    llm = LLM(model_dir, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    llm.shutdown()
    port = _free_port()
    config = server_config([model_config("llama", model_dir, parallelism=parallelism or {"tensor": 2})], host=master,
                           rank_heartbeat_timeout_s=HEARTBEAT_S)
    config_path = tmp_path / "node1.yaml"
    config_path.write_text(yaml.safe_dump(config))
    node_args = ("--nnodes", "2", "--node-rank", "0", "--master-addr", master, "--master-port", str(port))
    log1 = tmp_path / "node1.log"
    with _node1(config_path, log1, master, port, prefix) as node1, \
            run_server(config, tmp_path, serve_args=node_args) as server:
        assert _completions(server) == expected, log1.read_text()
        os.killpg(node1.pid, signal.SIGKILL)  # the whole node: its process and its ranks
        node1.wait(10)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as error:
            _completions(server)
        assert error.value.status_code in (500, 503) and time.monotonic() - started < 60
        with pytest.raises(openai.APIStatusError) as error:  # restarting: waiting for node 1's ranks
            _completions(server)
        assert error.value.status_code == 503
        with _node1(config_path, log1, master, port, prefix) as node1:
            _wait_ready(server)
            assert _completions(server) == expected, log1.read_text()
            cut(node1)
            started = time.monotonic()
            try:
                with pytest.raises(openai.APIStatusError) as error:  # waited out the collective timeout (2 min)
                    _completions(server)
                assert error.value.status_code in (500, 503) and time.monotonic() - started < HEARTBEAT_S + 20
                # Found by its silent heartbeat or, where node 1 froze in the middle of a step, as stuck in it: which
                # one depends on where the cut falls; both within the heartbeat timeout
                wait_for_model_error(server, "llama", (
                    f"rank 1 on another node (no heartbeat for {HEARTBEAT_S} s)",
                    f"rank 1 on another node (stuck: busy in one step for {HEARTBEAT_S} s while rank 0 waited"))
            finally:
                mend(node1)
            _wait_ready(server)  # node 1's ranks found rank 0 gone, ended and rejoined
            assert _completions(server) == expected, log1.read_text()


@pytest.mark.parametrize("parallelism", [{"tensor": 2}, {"pipeline": 2}], ids=["tp2", "pp2"])
def test_two_nodes_on_one_machine(tiny_model, tmp_path, parallelism):
    """Tensor-parallel ranks split every layer across the nodes; pipeline stages put one stage on each."""
    _serve_on_two_nodes(tiny_model, tmp_path, "127.0.0.1", cut=lambda node1: os.killpg(node1.pid, signal.SIGSTOP),
                        mend=lambda node1: os.killpg(node1.pid, signal.SIGCONT), parallelism=parallelism)


def _make_netns() -> bool:
    """Node 1's own network namespace, joined to this one by a veth pair; False where that cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)
    steps = [["ip", "netns", "add", NETNS],
             ["ip", "link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", NETNS],
             ["ip", "addr", "add", f"{HOST_ADDR}/24", "dev", VETH], ["ip", "link", "set", VETH, "up"],
             ["ip", "-n", NETNS, "addr", "add", f"{NODE1_ADDR}/24", "dev", "eth0"],
             ["ip", "-n", NETNS, "link", "set", "eth0", "up"], ["ip", "-n", NETNS, "link", "set", "lo", "up"]]
    return all(subprocess.run(step, capture_output=True).returncode == 0 for step in steps)


def _link(name: str, state: str) -> None:
    subprocess.run(["ip", "link", "set", name, state], check=True)


def test_two_nodes_on_two_addresses(tiny_model, tmp_path):
    if not _make_netns():
        pytest.skip("needs root and iproute2 to make a network namespace")
    try:
        _serve_on_two_nodes(tiny_model, tmp_path, HOST_ADDR, prefix=("ip", "netns", "exec", NETNS),
                            cut=lambda _: _link(VETH, "down"), mend=lambda _: _link(VETH, "up"))
    finally:
        subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)
