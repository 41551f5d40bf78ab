"""A bounded schemathesis run over every operation of the OpenAPI document (`tests/helpers_fuzz.py`): no 5xx, no
dropped connection, every error in OpenAI's shape. `scripts/fuzz_api.py` runs the same for longer."""

import pytest

pytest.register_assert_rewrite("helpers_server", "helpers_fuzz")
from helpers_fuzz import fuzz, fuzz_config
from helpers_server import run_inprocess

EXAMPLES_PER_OPERATION = 25  # about 40 s in all on the 2-core CI machine


def test_fuzzing_the_openapi_document_finds_no_server_error(tiny_model):
    with run_inprocess(fuzz_config(tiny_model)) as server:
        statuses = fuzz(server.base_url, EXAMPLES_PER_OPERATION)
    # The run reached every route family, and the generation routes answered some requests with 200.
    operations = {key.rsplit(" ", 1)[0] for key in statuses}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "GET /v1/models"} <= operations
    assert any(key.startswith("POST /v1/completions 200") for key in statuses), statuses
    assert any(key.endswith(" 400") for key in statuses), statuses
