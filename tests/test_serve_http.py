"""The OpenAI-compatible server (`infer.serve`) and its load test (`infer.load_test`), through real HTTP.

One uvicorn server runs in a background thread for the whole module, around an engine of tiny random
models (they compile in seconds) and SmolLM2's tokenizer. Its EOS is remapped to a token the target
emits early for one prompt, so that finishing on EOS ("stop") is exercised as well as "length".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

import jspec
from infer.load_test import LoadTest, Outcome, ResponseError, check_whole, run_load_test
from infer.serve import TextStream, create_app
from jspec.models import ModelConfig

from conftest import perturbed, random_model

MODEL = "tiny-test"
MAX_LEN = 256
STOP_PROMPT = "Say something short."  # the chat prompt whose greedy answer ends on the remapped EOS
STOP_AT = 4  # the remapped EOS is the token the target answers STOP_PROMPT with at this index


@dataclasses.dataclass
class RemappedEos:
    """SmolLM2's tokenizer with another token as EOS."""

    tokenizer: object
    eos_id: int

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids, *, skip_special_tokens=False):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages):
        return self.tokenizer.apply_chat_template(messages)


@dataclasses.dataclass
class Served:
    url: str
    engine: jspec.serve.Engine
    target: object
    tokenizer: RemappedEos


def greedy(target, prompt_ids, max_new_tokens: int, eos_id: int | None) -> list[int]:
    """The reference: `jspec.generate`, greedy, alone."""
    out = jspec.generate(target, np.asarray([prompt_ids], np.int32), max_new_tokens=max_new_tokens, eos_id=eos_id)
    return np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free port in a background thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def served():
    chat = jspec.demo.tokenizer("smollm2-135m")
    config = ModelConfig(
        vocab_size=chat.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=MAX_LEN,
        tie_embeddings=False,
    )  # fmt: skip
    target = random_model(config, seed=0)
    drafter = perturbed(target, 0.3, seed=1)  # agrees often: rounds keep several tokens
    stop_prompt = chat.apply_chat_template([{"role": "user", "content": STOP_PROMPT}])
    tokenizer = RemappedEos(chat, greedy(target, stop_prompt, STOP_AT + 1, None)[STOP_AT])
    engine = jspec.serve.Engine(target, drafter, jspec.Chain(k=3), slots=4, max_len=MAX_LEN)
    with running(create_app(engine, tokenizer, model_name=MODEL)) as url:
        yield Served(url, engine, target, tokenizer)


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


@pytest.fixture
def slow_engine(served):
    """Each engine step takes at least 50 ms, so that a long request is still running when its
    client leaves (the tiny models would otherwise finish it first)."""
    step = served.engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    served.engine.step = slow_step
    yield served.engine
    del served.engine.step  # back to the class's method


def sse_payloads(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def stream(client: httpx.Client, path: str, body: dict) -> tuple[str, list[dict], list[str]]:
    """POST a streamed request: (content type, JSON chunks, raw payloads)."""
    with client.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        payloads = sse_payloads(response.iter_lines())
        kind = response.headers["content-type"]
    assert payloads[-1] == "[DONE]"
    return kind, [json.loads(p) for p in payloads[:-1]], payloads


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def assert_serves(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_text_stream_never_splits_a_character(served):
    text = "🦀 crab 日本語"
    ids = served.tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters take several tokens
    stream = TextStream(served.tokenizer, eos_id=None)
    pieces = [stream.delta(ids[: i + 1], finished=i == len(ids) - 1) for i in range(len(ids))]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [(m["id"], m["object"]) for m in listing["data"]] == [(MODEL, "model")]


def test_completion_is_greedy_generate(client, served):
    prompt = "The quick brown fox"
    ids = served.tokenizer.encode(prompt)
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = greedy(served.target, ids, 12, served.tokenizer.eos_id)
    finish = "stop" if expected[-1] == served.tokenizer.eos_id else "length"
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": served.tokenizer.decode(expected), "logprobs": None, "finish_reason": finish}]
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }
    # The engine kept exactly generate's tokens.
    (completion,) = [c for c in list(served.engine.completions.values()) if c.request.prompt == tuple(ids)]
    assert completion.tokens == expected and completion.finish_reason == finish

    # The same prompt as token ids gives the same answer.
    again = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0}).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]


def test_chat_stops_at_eos(client, served):
    ids = served.tokenizer.apply_chat_template([{"role": "user", "content": STOP_PROMPT}])
    expected = greedy(served.target, ids, 20, served.tokenizer.eos_id)
    assert len(expected) <= STOP_AT + 1 and expected[-1] == served.tokenizer.eos_id
    body = {"model": MODEL, "messages": [{"role": "user", "content": STOP_PROMPT}], "max_completion_tokens": 20, "temperature": 0}
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": served.tokenizer.decode(expected[:-1])}
    # The EOS counts as a completion token but is not in the text.
    assert answer["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("content", ["Tell me a story about", STOP_PROMPT])
def test_streamed_equals_whole(client, served, chat, content):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0}
    body |= {"messages": [{"role": "user", "content": content}]} if chat else {"prompt": content}
    whole = client.post(path, json=body).json()
    kind, chunks, _ = stream(client, path, body | {"stream_options": {"include_usage": True}})
    assert kind.startswith("text/event-stream")

    *content_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(c["object"] == ("chat.completion.chunk" if chat else "text_completion") for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == MODEL for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in content_chunks]
    assert reasons[-1] == whole["choices"][0]["finish_reason"] and set(reasons[:-1]) <= {None}
    if chat:
        assert content_chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in content_chunks)
        assert text == whole["choices"][0]["text"]
    assert text  # the models are random, but never silent at temperature 0
    assert len(content_chunks) >= 2  # the text came in several pieces (plus the finish)


def test_stream_without_usage(client):
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 6, "temperature": 0}
    _, chunks, _ = stream(client, "/v1/completions", body)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_is_served(client):
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 4, "temperature": 1.0, "top_p": 0.9, "seed": 3}
    answer = client.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= answer["usage"]["completion_tokens"] <= 4


LONG_PROMPT = "word " * 300  # > MAX_LEN tokens

BAD_REQUESTS = {
    "malformed json": ("/v1/completions", b'{"prompt": "hi", ', 400, None),
    "not an object": ("/v1/completions", b"[1, 2]", 400, None),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    "prompt missing": ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    "prompt not text": ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    "token out of vocabulary": ("/v1/completions", {"prompt": [1, 10**6]}, 400, None),
    "prompt too long": ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, 400, None),
    "answer too long": ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_LEN}, 400, None),
    "temperature -1": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    "temperature text": ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    "top_p 0": ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    "top_p 1.5": ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    "max_tokens 0": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens 2.5": ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    "n 2": ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    "stop": ("/v1/completions", {"prompt": "hi", "stop": ["\n"]}, 400, "stop"),
    "stream not bool": ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    "messages missing": ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    "messages empty": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "message without role": ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    "chat too long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, None),
    "chat max_tokens 0": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_and_server_goes_on(client, served, case):
    path, body, status, param = BAD_REQUESTS[case]
    submitted = len(served.engine.completions)
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    error = assert_error(response, status, param)
    if case.endswith("too long"):
        assert "max_len=256" in error["message"] and error["code"] == "context_length_exceeded"
    assert len(served.engine.completions) == submitted  # nothing reached the engine
    assert_serves(client)


def test_unknown_path_and_method(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)
    assert_serves(client)


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _completions_of(engine, max_new_tokens: int):
    return [c for c in list(engine.completions.values()) if c.request.max_new_tokens == max_new_tokens]


def test_client_leaving_a_stream_cancels_its_request(served, slow_engine):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 241, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as leaving:
        with leaving.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    (completion,) = _completions_of(slow_engine, 241)
    assert _wait_for(lambda: completion.finish_reason is not None), "the request was not cancelled"
    assert completion.finish_reason == "cancelled" and len(completion.tokens) < 241
    assert _wait_for(lambda: slow_engine.idle)  # its slot is free
    with httpx.Client(base_url=served.url, timeout=30) as client:
        assert_serves(client)


def test_client_leaving_a_whole_answer_cancels_its_request(served, slow_engine):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 242, "temperature": 0}
    with httpx.Client(base_url=served.url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/completions", json=body)
    (completion,) = _completions_of(slow_engine, 242)
    assert _wait_for(lambda: completion.finish_reason is not None), "the request was not cancelled"
    assert completion.finish_reason == "cancelled" and len(completion.tokens) < 242


def test_load_test_finds_no_failures(served):
    prompts = ["Hello there", "What is two plus two?", "Name a colour."]
    summary = asyncio.run(
        run_load_test(served.url, concurrency=4, duration=30, max_requests=12, max_tokens=8, stream_fraction=0.5,
                      completion_fraction=0.5, prompts=prompts, seed=1)
    )  # fmt: skip
    assert summary["model"] == MODEL
    assert (summary["requests"], summary["succeeded"]) == (12, 12), summary["errors"]
    assert summary["failures"] == 0 and summary["mismatches"] == 0
    assert 0 < summary["streamed"] < 12 and summary["by_endpoint"]["chat"] > 0 and summary["by_endpoint"]["completions"] > 0
    assert summary["distinct_requests"] < 12  # requests repeated, so the consistency check compared answers
    assert 12 <= summary["completion_tokens"] <= 12 * 8 and summary["completion_tokens_per_s"] > 0
    assert summary["ttft_s"]["p50"] is not None and summary["ttft_s"]["p50"] <= summary["latency_s"]["p99"]


def test_load_test_reports_failed_requests(served):
    """The checks are not vacuous: refused requests are failures."""
    summary = asyncio.run(
        run_load_test(served.url, concurrency=2, duration=30, max_requests=4, max_tokens=4, stream_fraction=0.5,
                      completion_fraction=1.0, prompts=["Hello there"], model="not-served")
    )  # fmt: skip
    assert (summary["requests"], summary["failures"], summary["succeeded"]) == (4, 4, 0)
    assert all("HTTP 404" in e for e in summary["errors"])


def test_load_test_catches_a_changed_answer():
    test = LoadTest(None, model=MODEL, prompts=["a"], max_tokens=4, stream_fraction=0, completion_fraction=0, duration=1,
                    max_requests=None, seed=0)  # fmt: skip
    answers = [Outcome("chat", 0, 4, stream, text=text) for stream, text in ((False, "x y"), (True, "x y"), (True, "x z"))]
    for outcome in answers:
        test.compare(outcome)
    assert test.mismatches == 1 and [o.error is None for o in answers] == [True, True, False]
    choice = {"index": 0, "text": "", "finish_reason": "length"}
    usage = {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    with pytest.raises(ResponseError, match="completion_tokens 5"):
        check_whole({"object": "text_completion", "id": "c", "created": 0, "choices": [choice], "usage": usage}, False, 4)


class FailingEngine:
    """Stands in for `jspec.serve.Engine`: accepts requests, then its step raises."""

    max_len = 64

    def __init__(self):
        self.submitted = []

    def submit(self, prompt, **params):
        self.submitted.append(prompt)
        return len(self.submitted) - 1

    @property
    def idle(self):
        return not self.submitted

    def step(self):
        raise FloatingPointError("the device fell over")

    def cancel(self, request_id):
        pass


def test_a_failing_engine_fails_its_requests_not_the_server(served):
    with (
        running(create_app(FailingEngine(), served.tokenizer, model_name=MODEL)) as url,
        httpx.Client(base_url=url, timeout=10) as c,
    ):
        response = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert response.status_code == 503 and "the device fell over" in response.json()["error"]["message"]
        assert c.get("/health").status_code == 503
        # Later requests are refused at once rather than left waiting for a worker that stopped.
        again = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_unavailable"
