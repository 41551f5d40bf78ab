"""Where a parallel model's ranks and replicas run on GPUs: served data-parallel replicas take distinct devices
(the config's gpu_ids, else slices of the visible ones, per node), and a model with more ranks than this machine's
devices is refused with the numbers before any worker starts, and at config check. Checked without GPUs: the device
count is faked."""

import re

import pytest
import torch
import yaml

from appliance import node
from appliance.cli import main as kvbox
from appliance.config import ConfigError, local_gpus, parse_config
from appliance.node import NodeLayout
from appliance.server import ServeOptions
from appliance.supervisor import replica_env
from engine.config import EngineConfig, EngineConfigError
from engine.distributed import tp_runner


def envs(monkeypatch, parallelism: dict, visible: str | None, layout: NodeLayout | None = None, **model) -> list:
    monkeypatch.setattr(node, "_has_cuda", lambda: True)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    config = parse_config(yaml.safe_dump({"models": [{"name": "m", "source": "/", "parallelism": parallelism,
                                                       **model}]}))
    spec = config.models[0]
    ranks_here = len(layout.local_ranks(spec)) if layout else None
    return [replica_env(spec, r, config, ranks_here).get("CUDA_VISIBLE_DEVICES") for r in range(spec.parallelism.data)]


def test_data_parallel_replicas_take_distinct_visible_gpus(monkeypatch):
    assert envs(monkeypatch, {"data": 2}, None) == ["0", "1"]
    assert envs(monkeypatch, {"data": 2, "tensor": 2}, None) == ["0,1", "2,3"]
    assert envs(monkeypatch, {"data": 2}, "3, 5") == ["3", "5"]  # within the operator's own choice
    assert envs(monkeypatch, {"data": 2, "tensor": 2}, "4,5,6,7", device="cuda") == ["4,5", "6,7"]
    assert envs(monkeypatch, {"data": 2}, "7", device="auto") == [None, None]  # one card: shared, as before
    assert envs(monkeypatch, {"data": 2}, None, gpu_ids=[3, 1]) == ["3", "1"]  # the config's own ids
    assert envs(monkeypatch, {"tensor": 2}, None) == [None]  # one replica: its ranks take cuda:0, cuda:1


def test_a_nodes_replicas_take_its_share_of_each_replicas_ranks(monkeypatch):
    # tensor 4 over 2 nodes: 2 ranks of each replica per node, so the replicas take 2 devices each on both nodes
    for node_rank in (0, 1):
        layout = NodeLayout(nnodes=2, node_rank=node_rank)
        assert envs(monkeypatch, {"data": 2, "tensor": 4}, None, layout) == ["0,1", "2,3"]


@pytest.mark.parametrize(("options", "device", "local_ranks", "message"), [
    ({"tensor_parallel_size": 2}, "cuda", 2, r"tensor_parallel_size: tensor 2 x pipeline 1 ranks need 2 GPUs on this "
                                             r"machine \(cuda:0 to cuda:1\), 1 visible"),
    ({"pipeline_parallel_size": 2}, "cuda:1", 2, r"pipeline_parallel_size: .* need 2 GPUs .*\(cuda:1 to cuda:2\), 2 "
                                                 r"visible"),
])
def test_more_ranks_than_gpus_are_refused_before_any_worker_starts(monkeypatch, options, device, local_ranks,
                                                                   message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if device == "cuda" else 2)
    config = EngineConfig.from_kwargs("/m", **options)
    with pytest.raises(EngineConfigError, match=message):
        tp_runner._check_devices(config, torch.device(device), local_ranks)
    tp_runner._check_devices(config, torch.device("cpu"), local_ranks)  # CPU ranks share the cores


@pytest.mark.parametrize(("model", "visible", "nodes", "problem"), [
    ({"parallelism": {"tensor": 2}}, "0", None, "models[0].parallelism.tensor: tensor 2 x pipeline 1 ranks need 2 "
                                                "GPUs on this machine (cuda:0 to cuda:1), 1 visible"),
    ({"parallelism": {"pipeline": 2}, "device": "cuda:1"}, "0,1", None,
     "models[0].parallelism.pipeline: tensor 1 x pipeline 2 ranks need 2 GPUs on this machine (cuda:1 to cuda:2), "
     "2 visible"),
    ({"parallelism": {"tensor": 2, "pipeline": 2}}, "0,1,-1,3", None, "need 4 GPUs on this machine (cuda:0 to "
                                                                      "cuda:3), 2 visible"),
    ({"parallelism": {"tensor": 4}}, "0", (2, 1), "need 2 GPUs on node 1 of 2 (ranks 2 to 3) (cuda:0 to cuda:1), "
                                                  "1 visible"),
    ({"parallelism": {"tensor": 4}}, "0,1", (2, 1), None),  # each node holds 2 of the 4 ranks
    ({"parallelism": {"tensor": 2, "data": 2}}, "0,1", None, None),  # the replicas share the 2 devices
    ({"parallelism": {"tensor": 2}}, "", None, None),  # no GPU visible: the ranks run on the CPU
    ({"parallelism": {"tensor": 2}, "device": "cpu"}, "0", None, None),
    ({"parallelism": {"tensor": 2}, "gpu_ids": [4, 5]}, "0", None, None),  # the config's own ids
])
def test_more_ranks_than_visible_gpus_are_refused_at_config_check(monkeypatch, model, visible, nodes, problem):
    monkeypatch.setattr(local_gpus, "_driver_gpu_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    text = yaml.safe_dump({"models": [{"name": "m", "source": "/", **model}]})
    if problem is None:
        parse_config(text, nodes=nodes)
    else:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            parse_config(text, nodes=nodes)


def test_config_check_counts_this_nodes_ranks_as_kvbox_serve_is_told(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(local_gpus, "_driver_gpu_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "source": str(tmp_path), "parallelism": {"tensor": 2}}]}))
    assert kvbox(["check-config", str(path)]) == 1
    assert "models[0].parallelism.tensor: tensor 2 x pipeline 1 ranks need 2 GPUs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="1 visible"):
        ServeOptions().load(str(path))
    ServeOptions(nodes=NodeLayout(nnodes=2, node_rank=1)).load(str(path))  # one rank per node
    monkeypatch.setenv("KVBOX_NNODES", "2")  # check-config takes kvbox serve's environment
    assert kvbox(["check-config", str(path)]) == 0
    monkeypatch.setattr(local_gpus, "_driver_gpu_count", lambda: 0)  # no driver: not checked
    monkeypatch.delenv("KVBOX_NNODES")
    assert kvbox(["check-config", str(path)]) == 0
