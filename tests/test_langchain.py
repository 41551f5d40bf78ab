"""LangChain's `ChatOpenAI` against an in-process server, as agents use it: `with_structured_output(PydanticModel)`
(OpenAI's json_schema response format, validated by pydantic), `bind_tools` with a forced tool (arguments validate
against the tool's schema), streaming, and the same model over the Responses API (`use_responses_api=True`)."""


import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import API_KEY, model_config, run_inprocess, server_config
from test_structured_api import Weather

langchain_openai = pytest.importorskip("langchain_openai")


@pytest.fixture(scope="module")
def server(tiny_model):
    config = server_config([model_config("llama", tiny_model("llama", max_position_embeddings=512))])
    with run_inprocess(config) as server:
        yield server


def _llm(server, **options):
    return langchain_openai.ChatOpenAI(model="llama", base_url=f"{server.base_url}/v1", api_key=API_KEY,
                                       max_retries=0, extra_body={"seed": 1}, **options)


@pytest.mark.parametrize("responses_api", [False, True])
def test_with_structured_output(server, responses_api):
    llm = _llm(server, max_tokens=80, use_responses_api=responses_api).with_structured_output(Weather)
    weather = llm.invoke("Weather in Paris?")
    assert isinstance(weather, Weather)  # pydantic validated the pattern, the enum and the bounds


@pytest.mark.parametrize("responses_api", [False, True])
def test_bind_tools_with_a_forced_tool(server, responses_api):
    llm = _llm(server, max_tokens=80, use_responses_api=responses_api).bind_tools([Weather], tool_choice="Weather")
    (call,) = llm.invoke("Weather in Paris?").tool_calls
    assert call["name"] == "Weather" and call["id"].startswith("call_")
    Weather.model_validate(call["args"])


def test_streaming(server):
    llm = _llm(server, max_tokens=8, temperature=0)
    chunks = list(llm.stream("Tell me a story"))
    whole = llm.invoke("Tell me a story")
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == whole.content
