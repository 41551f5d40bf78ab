"""The environment the supervisor gives each engine process: CPU engines share the cores and sleep, rather than
spin, at OpenMP barriers; the operator's own OMP_* variables win."""

import yaml

from appliance.config import parse_config
from appliance.supervisor import replica_env


def replica_envs(models: list[dict]) -> list[dict[str, str]]:
    config = parse_config(yaml.safe_dump({"models": models}))
    return [replica_env(spec, 0, config) for spec in config.models]


def test_cpu_engines_share_the_cores_and_wait_passively(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    models = [{"name": n, "source": str(tmp_path), "device": "cpu"} for n in ("a", "b")]
    assert replica_envs(models) == [{"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"}] * 2


def test_the_operators_openmp_settings_win(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert replica_envs([{"name": "a", "source": str(tmp_path), "device": "cpu"}]) == [{}]


def test_gpu_engines_keep_their_threads_but_wait_passively(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    models = [{"name": "a", "source": str(tmp_path), "device": "cuda", "gpu_ids": [1]}]
    assert replica_envs(models) == [{"CUDA_VISIBLE_DEVICES": "1", "OMP_WAIT_POLICY": "PASSIVE"}]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert replica_envs(models) == [{"CUDA_VISIBLE_DEVICES": "1"}]
