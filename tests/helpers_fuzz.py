"""Schemathesis over the server's own OpenAPI document, for `tests/test_openapi_fuzz.py` (bounded) and
`scripts/fuzz_api.py` (as long as asked): every operation gets generated requests, positive and negative (bodies
that break the schema), each checked: no status >= 500, a dropped connection fails the run, and every error is
OpenAI's error object.
"""

from __future__ import annotations

from collections import Counter

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from helpers_server import API_KEY, model_config, server_config

ERROR_KEYS = {"message", "type", "param", "code"}


def fuzz_config(tiny_model) -> dict:
    """A server whose every valid request is cheap: a generated request may ask for all the tokens it is allowed."""
    return server_config([model_config("m", tiny_model("llama"))], max_tokens=8, max_n=2, max_logprobs=2,
                         max_prompt_chars=2000)


def check_response(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS and error["message"], response.text[:500]


def fuzz(base_url: str, examples_per_operation: int, seed: int | None = 0) -> Counter:
    """Runs the examples; returns the statuses seen, per operation."""
    document = requests.get(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"},
                            timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    statuses: Counter = Counter()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=examples_per_operation, deadline=None, database=None, derandomize=seed is not None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case) -> None:
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = "m"  # a random name only ever meets the 404; the catalogue tests that one
            response = case.call(base_url=base_url, session=session, timeout=60,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
            statuses[f"{operation.method.upper()} {operation.path} {response.status_code}"] += 1
            check_response(response)

        run()
    return statuses
