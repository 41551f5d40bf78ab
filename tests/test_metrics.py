"""/metrics against vLLM's: every query of vLLM's example Grafana dashboard finds its series after some traffic, the
core set has vLLM's types and buckets, and the engine's phase timings add up."""

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.register_assert_rewrite("helpers_server")
pytest_plugins = ["helpers_server"]

# The `expr` of every target of vLLM's examples/online_serving/prometheus_grafana/grafana.json (written out here,
# not vendored), with Grafana's `$model_name` and `$__rate_interval`.
VLLM_GRAFANA_QUERIES = [
    'histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="$model_name"}'
    '[$__rate_interval])))',
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\n'
    'rate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket{model_name="$model_name"}'
    '[$__rate_interval])))',
    'rate(vllm:time_per_output_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\n'
    'rate(vllm:time_per_output_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_swapped{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{model_name="$model_name"}'
    '[$__rate_interval])))',
    'rate(vllm:time_to_first_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\n'
    'rate(vllm:time_to_first_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'vllm:cpu_cache_usage_perc{model_name="$model_name"}',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
]

# vLLM's core set beyond the dashboard: name -> (type, buckets or None).
_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0]
VLLM_CORE = {
    "vllm:request_inference_time_seconds": ("histogram", _LATENCY),
    "vllm:request_queue_time_seconds": ("histogram", _LATENCY),
    "vllm:e2e_request_latency_seconds": ("histogram", _LATENCY),
    "vllm:iteration_tokens_total": ("histogram", [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]),
    "vllm:request_params_n": ("histogram", [1, 2, 5, 10, 20]),
    "vllm:request_params_max_tokens": ("histogram", None),
    "vllm:time_per_output_token_seconds": ("histogram", [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                                                         0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]),
    "vllm:cache_config_info": ("gauge", None),
}


def _samples(text: str) -> dict[str, list]:
    """Sample name -> its samples (of every label set)."""
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def _value(samples: dict[str, list], name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def traffic(api_server):
    """/metrics before and after: a plain completion (n=2), a streamed chat, a request with a stop string."""
    def scrape():
        with api_server.http() as http:
            response = http.get("/metrics")
        assert response.status_code == 200
        return response

    before = _samples(scrape().text)
    client = api_server.client()
    client.completions.create(model="llama", prompt="The quick brown fox", max_tokens=5, n=2,
                              extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, stream=True, extra_body={"ignore_eos": True})
    assert [chunk for chunk in stream]
    response = scrape()
    return before, _samples(response.text), response


def test_every_query_of_vllms_grafana_dashboard_has_data(traffic):
    _, after, _ = traffic
    for query in VLLM_GRAFANA_QUERIES:
        for name in re.findall(r"vllm:\w+", query):
            samples = [s for s in after.get(name, []) if s.labels.get("model_name") == "llama"]
            assert samples, f"{name} (of {query!r}) has no series for model llama"
            if name.endswith(("_count", "_sum", "_total")) and "perc" not in name:
                assert sum(s.value for s in samples) > 0, f"{name} is still 0 after traffic"


def test_the_core_set_has_vllms_types_and_buckets(traffic):
    _, _, response = traffic
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name, (kind, buckets) in VLLM_CORE.items():
        family = families.get(name)
        assert family is not None and family.type == kind, name
        if buckets is not None:
            bounds = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
            assert bounds == [*map(float, buckets), float("inf")], name
    # One content type, one charset (litestar appends it; prometheus_client's constant has it already).
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_request_phases_params_and_lengths_are_counted(traffic):
    before, after, _ = traffic

    def grew(name: str, **labels) -> float:
        return _value(after, name, model_name="llama", **labels) - _value(before, name, model_name="llama", **labels)

    # Three engine samples finished (n=2, then one chat), each with the engine's phase timings.
    for phase in ("queue", "prefill", "decode", "inference"):
        assert grew(f"vllm:request_{phase}_time_seconds_count") == 3, phase
    inference, prefill, decode = (grew(f"vllm:request_{p}_time_seconds_sum") for p in ("inference", "prefill",
                                                                                       "decode"))
    assert inference == pytest.approx(prefill + decode) and decode > 0
    assert grew("vllm:request_generation_tokens_sum") == 5 + 5 + 4
    assert grew("vllm:request_max_num_generation_tokens_sum") == 5 + 4
    assert grew("vllm:request_params_n_sum") == 2 + 1
    assert grew("vllm:request_params_max_tokens_sum") == 5 + 4
    assert grew("vllm:request_params_max_tokens_bucket", le="5.0") == 2
    assert grew("vllm:request_success_total", finished_reason="length") == 3
    # Tokens per engine step: every generated token and every prompt show up in some step.
    prompt_tokens = grew("vllm:prompt_tokens_total")
    assert grew("vllm:iteration_tokens_total_sum") == prompt_tokens + 14
    info = [s for s in after["vllm:cache_config_info"] if s.labels["model_name"] == "llama"]
    assert info[0].value == 1 and info[0].labels["num_gpu_blocks"] == "300" and info[0].labels["block_size"]


def test_our_grafana_dashboard_queries_only_metrics_we_export(traffic):
    _, after, response = traffic
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-kvbox.json").read_text())
    families = {f.name for f in text_string_to_metric_families(response.text)}
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"(?:vllm|kvbox):\w+", target["expr"])}
    assert len(queried) > 20
    for name in queried:
        assert name in after or name in families or re.sub(r"_(bucket|sum|count|total)$", "", name) in families, name
