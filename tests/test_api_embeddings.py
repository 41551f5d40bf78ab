"""/v1/embeddings, /v1/score, /v1/rerank and /v2/rerank end to end over HTTP (in process): the openai client's
`embeddings.create` against the offline engine's vectors, a cross-encoder's and an embedder's scores, rerank's order
and shape, and the errors (wrong task, bad fields, inputs too long, `dimensions` on a non-Matryoshka model)."""

from __future__ import annotations

import openai
import pytest

from engine.llm import LLM
from tests.helpers_server import model_config, run_inprocess, server_config

TEXTS = ["hello world", "the fibonacci sequence in python", "a"]
QUERY = "what computes fibonacci numbers?"


@pytest.fixture(scope="module")
def paths(tiny_model):
    return {"embed": tiny_model("bert", pooling="mean"), "score": tiny_model("bert-cross"),
            "llama": tiny_model("llama")}


@pytest.fixture(scope="module")
def server(paths):
    config = server_config([
        model_config("embedder", paths["embed"], task="embed", matryoshka_dimensions=[16, 32]),
        model_config("plain-embedder", paths["embed"], task="embed"),
        model_config("reranker", paths["score"], task="score"),
        model_config("llama", paths["llama"]),
    ])
    with run_inprocess(config) as running:
        yield running


@pytest.fixture(scope="module")
def offline(paths):
    return (LLM(paths["embed"], task="embed", device="cpu", dtype="float32", num_kv_blocks=32),
            LLM(paths["score"], task="score", device="cpu", dtype="float32", num_kv_blocks=32))


def test_openai_client_embeddings_match_the_engine(server, offline):
    client = server.client()
    want = [o.embedding for o in offline[0].embed(TEXTS, use_tqdm=False)]
    response = client.embeddings.create(model="embedder", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in response.data] == [0, 1, 2]
    for got, expected in zip(response.data, want):
        assert got.embedding == pytest.approx(expected, abs=1e-6)
    tokenizer_ids = [o.prompt_token_ids for o in offline[0].embed(TEXTS, use_tqdm=False)]
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(map(len, tokenizer_ids))
    floats = client.embeddings.create(model="embedder", input=TEXTS[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(want[0], abs=1e-6)
    by_ids = client.embeddings.create(model="embedder", input=tokenizer_ids, encoding_format="float")
    assert by_ids.data[2].embedding == pytest.approx(want[2], abs=1e-6)
    single_ids = client.embeddings.create(model="embedder", input=tokenizer_ids[1], encoding_format="float")
    assert single_ids.data[0].embedding == pytest.approx(want[1], abs=1e-6)
    short = client.embeddings.create(model="embedder", input=TEXTS[0], dimensions=16, encoding_format="float")
    assert len(short.data[0].embedding) == 16
    assert sum(x * x for x in short.data[0].embedding) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("model, body, status, param, message", [
    ("llama", {"input": "hi"}, 400, "model", "serves task 'generate'"),
    ("plain-embedder", {"input": "hi", "dimensions": 16}, 400, "dimensions", "not a Matryoshka model"),
    ("embedder", {"input": "hi", "dimensions": 8}, 400, "dimensions", "16, 32"),
    ("embedder", {"input": "hi", "encoding_format": "int8"}, 400, "encoding_format", "Invalid enum value"),
    ("embedder", {"input": "hi", "input_type": "query"}, 400, "input_type", "nknown field"),
    ("embedder", {"input": []}, 400, "input", "expected a string"),
    ("embedder", {"input": ["word " * 200]}, 400, "input", "at most 128"),
    ("embedder", {"input": [[1, 99999]]}, 400, "input", "token ids must be"),
])
def test_embeddings_errors(server, model, body, status, param, message):
    response = server.http().post("/v1/embeddings", json={"model": model, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_chat_on_an_embedder_names_its_task(server):
    with pytest.raises(openai.BadRequestError) as error:
        server.client().chat.completions.create(model="embedder", messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["param"] == "model" and "serves task 'embed'" in error.value.body["message"]


def test_score_one_to_many_and_pairwise(server, offline):
    want = [o.score for o in offline[1].score(QUERY, TEXTS, use_tqdm=False)]
    http = server.http()
    body = http.post("/v1/score", json={"model": "reranker", "text_1": QUERY, "text_2": TEXTS}).json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["object"] == "list"
    assert [d["score"] for d in body["data"]] == pytest.approx(want, abs=1e-6)
    pairwise = http.post("/v1/score", json={"model": "reranker", "text_1": [QUERY, QUERY], "text_2": TEXTS[:2]}).json()
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(want[:2], abs=1e-6)
    mismatch = http.post("/v1/score", json={"model": "reranker", "text_1": [QUERY] * 2, "text_2": TEXTS})
    assert mismatch.status_code == 400 and mismatch.json()["error"]["param"] == "text_2"
    # An embedding model scores by cosine similarity.
    cosine = http.post("/v1/score", json={"model": "embedder", "text_1": TEXTS[0], "text_2": TEXTS}).json()
    assert cosine["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_sorts_and_cuts(server, offline, path):
    want = [o.score for o in offline[1].score(QUERY, TEXTS, use_tqdm=False)]
    body = server.http().post(path, json={"model": "reranker", "query": QUERY, "documents": TEXTS,
                                          "top_n": 2}).json()
    order = sorted(range(3), key=lambda i: -want[i])[:2]
    assert [r["index"] for r in body["results"]] == order
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([want[i] for i in order], abs=1e-6)
    assert [r["document"]["text"] for r in body["results"]] == [TEXTS[i] for i in order]
    bare = server.http().post(path, json={"model": "reranker", "query": QUERY, "documents": TEXTS,
                                          "return_documents": False}).json()
    assert len(bare["results"]) == 3 and "document" not in bare["results"][0]
    wrong = server.http().post(path, json={"model": "llama", "query": QUERY, "documents": TEXTS})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
