"""Load-test an OpenAI-compatible server (`python -m infer.serve`) and check every answer.

    python -m infer.load_test --url http://127.0.0.1:8000 --concurrency 8 --duration 60
    python -m infer.load_test --concurrency 4 --duration 30 --max-requests 100 --max-tokens 64 --out runs/load.json

N asyncio clients (httpx) each send one request after another until `--duration` seconds have
passed or `--max-requests` requests were started. Each request picks a prompt from a fixed list
(the first turns of Spec-Bench's first `--num-prompts` questions, `$JSPEC_SPEC_BENCH` or
../shared/data/spec_bench/question.jsonl, else a few built-in prompts), mostly as a chat
(/v1/chat/completions), some as a plain completion (/v1/completions); a `--stream-fraction` of them
streamed. All are greedy (temperature 0).

Reported: requests/s and completion tokens/s over the run, latency, TTFT (time to the first text,
streamed requests) and TPOT ((latency - TTFT) / (tokens - 1), streamed requests) percentiles.
Every response is checked: HTTP 200, OpenAI's shape, a valid finish_reason, usage consistent with
max_tokens (and with finish_reason "length"), and, since decoding is greedy, the same text for the
same (endpoint, prompt, max_tokens) every time, streamed or not: the first answer is the reference
and any other is a mismatch. The exit status is 1 if any request failed or mismatched.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import time

import httpx
import numpy as np

from infer.spec_bench import default_spec_bench

BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Explain what a Python dictionary is.",
    "Write a haiku about the sea.",
    "List three prime numbers and say why they are prime.",
    "How does a binary search work?",
    "Give me a short recipe for pancakes.",
)
FINISH_REASONS = ("stop", "length")


def load_prompts(path: str | None, count: int) -> list[str]:
    """The first turn of the first `count` questions of a Spec-Bench JSONL, or the built-in prompts."""
    if path is None:
        return list(BUILTIN_PROMPTS[:count])
    prompts = []
    with open(path) as f:
        for line in f:
            if line.strip() and len(prompts) < count:
                prompts.append(str(json.loads(line)["turns"][0]))
    return prompts


@dataclasses.dataclass
class Outcome:
    """One request's result: whether it passed the checks (`error` says why not), its text, timing."""

    endpoint: str
    prompt: int
    max_tokens: int
    stream: bool
    error: str | None = None
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    latency: float = 0.0
    ttft: float | None = None


class ResponseError(Exception):
    """A response that is not what the API promises."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ResponseError(message)


def _check_usage(usage, max_tokens: int, finish_reason: str) -> int:
    """Completion tokens from a usage object, checked against max_tokens and finish_reason."""
    _expect(isinstance(usage, dict), f"usage must be an object, got {usage!r}")
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    _expect(all(isinstance(c, int) and c >= 0 for c in counts), f"usage must hold counts, got {usage!r}")
    prompt, completion, total = counts
    _expect(total == prompt + completion, f"usage: total_tokens != prompt_tokens + completion_tokens in {usage!r}")
    _expect(1 <= completion <= max_tokens, f"usage: completion_tokens {completion} not in [1, max_tokens={max_tokens}]")
    if finish_reason == "length":
        _expect(completion == max_tokens, f"finish_reason 'length' after {completion} of max_tokens={max_tokens} tokens")
    return completion


def _check_choice(body: dict, obj: str) -> dict:
    _expect(isinstance(body, dict) and body.get("object") == obj, f"object must be {obj!r}, got {str(body)[:200]}")
    _expect(isinstance(body.get("id"), str) and isinstance(body.get("created"), int), "id and created are required")
    choices = body.get("choices")
    _expect(isinstance(choices, list), f"choices must be a list, got {choices!r}")
    if not choices:
        return {}
    _expect(len(choices) == 1 and choices[0].get("index") == 0, f"expected one choice of index 0, got {choices!r}")
    return choices[0]


def check_whole(body: dict, chat: bool, max_tokens: int) -> tuple[str, int, str]:
    """(text, completion_tokens, finish_reason) of a non-streamed response, checked."""
    choice = _check_choice(body, "chat.completion" if chat else "text_completion")
    _expect(bool(choice), "choices must not be empty")
    if chat:
        message = choice.get("message")
        _expect(isinstance(message, dict) and message.get("role") == "assistant", f"bad message {message!r}")
        text = message.get("content")
    else:
        text = choice.get("text")
    _expect(isinstance(text, str), f"the text must be a string, got {text!r}")
    finish_reason = choice.get("finish_reason")
    _expect(finish_reason in FINISH_REASONS, f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    return text, _check_usage(body.get("usage"), max_tokens, finish_reason), finish_reason


class StreamChecker:
    """Checks a stream's chunks one by one and gathers its text, finish reason and usage."""

    def __init__(self, chat: bool, max_tokens: int):
        self.chat, self.max_tokens = chat, max_tokens
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None
        self.done = False

    def feed(self, data: str) -> bool:
        """Take one `data:` payload; returns whether it carried text or the finish reason."""
        _expect(not self.done, "data after [DONE]")
        if data == "[DONE]":
            self.done = True
            return False
        chunk = json.loads(data)
        _expect("error" not in chunk, f"error in the stream: {chunk.get('error')!r}")
        choice = _check_choice(chunk, "chat.completion.chunk" if self.chat else "text_completion")
        if not choice:  # the usage chunk, after the finish
            _expect(self.finish_reason is not None, "a usage chunk before the finish_reason")
            self.completion_tokens = _check_usage(chunk.get("usage"), self.max_tokens, self.finish_reason)
            return False
        _expect(self.finish_reason is None, "a chunk after the one with finish_reason")
        text = choice.get("delta", {}).get("content") if self.chat else choice.get("text")
        _expect(text is None or isinstance(text, str), f"chunk text must be a string, got {text!r}")
        self.parts.append(text or "")
        reason = choice.get("finish_reason")
        _expect(reason is None or reason in FINISH_REASONS, f"finish_reason must be one of {FINISH_REASONS}, got {reason!r}")
        self.finish_reason = reason
        return bool(text) or reason is not None

    def result(self) -> tuple[str, int, str]:
        _expect(self.done, "the stream did not end with [DONE]")
        _expect(self.finish_reason is not None, "no chunk carried a finish_reason")
        _expect(self.completion_tokens is not None, "no usage chunk (stream_options.include_usage was set)")
        return "".join(self.parts), self.completion_tokens, self.finish_reason


class LoadTest:
    """Shared state of one run: the request plan, the reference texts, the outcomes."""

    def __init__(self, client: httpx.AsyncClient, *, model: str, prompts: list[str], max_tokens: int, stream_fraction: float,
                 completion_fraction: float, duration: float, max_requests: int | None, seed: int):  # fmt: skip
        self.client, self.model, self.prompts, self.max_tokens = client, model, prompts, max_tokens
        self.stream_fraction, self.completion_fraction = stream_fraction, completion_fraction
        self.deadline = time.perf_counter() + duration
        self.max_requests = max_requests
        self.rng = random.Random(seed)  # one event loop: no lock needed
        self.started = 0
        self.outcomes: list[Outcome] = []
        self.references: dict[tuple, str] = {}
        self.mismatches = 0

    def next_request(self) -> Outcome | None:
        """The next request to send, or None once the time or the request budget is spent."""
        if time.perf_counter() >= self.deadline or (self.max_requests is not None and self.started >= self.max_requests):
            return None
        self.started += 1
        endpoint = "completions" if self.rng.random() < self.completion_fraction else "chat"
        stream = self.rng.random() < self.stream_fraction
        return Outcome(endpoint, self.rng.randrange(len(self.prompts)), self.max_tokens, stream)

    def body(self, outcome: Outcome) -> dict:
        text = self.prompts[outcome.prompt]
        body = {"model": self.model, "max_tokens": outcome.max_tokens, "temperature": 0, "stream": outcome.stream}
        if outcome.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if outcome.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def send(self, outcome: Outcome) -> None:
        chat = outcome.endpoint == "chat"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        if outcome.stream:
            checker = StreamChecker(chat, outcome.max_tokens)
            async with self.client.stream("POST", path, json=self.body(outcome)) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise ResponseError(f"HTTP {response.status_code}: {response.text[:300]}")
                kind = response.headers.get("content-type", "")
                _expect(kind.startswith("text/event-stream"), f"content-type {kind!r}, not text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and checker.feed(line[6:]) and outcome.ttft is None:
                        outcome.ttft = time.perf_counter() - start
            result = checker.result()
        else:
            response = await self.client.post(path, json=self.body(outcome))
            if response.status_code != 200:
                raise ResponseError(f"HTTP {response.status_code}: {response.text[:300]}")
            result = check_whole(response.json(), chat, outcome.max_tokens)
        outcome.latency = time.perf_counter() - start
        outcome.text, outcome.completion_tokens, outcome.finish_reason = result

    def compare(self, outcome: Outcome) -> None:
        """Greedy decoding: the same request must always give the same text."""
        key = (outcome.endpoint, outcome.prompt, outcome.max_tokens)
        reference = self.references.setdefault(key, outcome.text)
        if outcome.text != reference:
            self.mismatches += 1
            outcome.error = f"mismatch: {outcome.text[:80]!r} != reference {reference[:80]!r}"

    async def client_loop(self) -> None:
        while (outcome := self.next_request()) is not None:
            try:
                await self.send(outcome)
                self.compare(outcome)
            except Exception as error:  # a bad or missing answer is a failure to report, not a crash
                outcome.error = f"{type(error).__name__}: {error}"
            self.outcomes.append(outcome)


def percentiles(values: list[float]) -> dict:
    """p50 / p90 / p99 in seconds (None without values)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def summarize(test: LoadTest, elapsed: float) -> dict:
    """The run's numbers (JSON-ready)."""
    ok = [o for o in test.outcomes if o.error is None]
    streamed = [o for o in ok if o.stream and o.ttft is not None]
    tpot = [(o.latency - o.ttft) / (o.completion_tokens - 1) for o in streamed if o.completion_tokens > 1]
    tokens = sum(o.completion_tokens for o in ok)
    errors = [o for o in test.outcomes if o.error is not None]
    return {
        "requests": len(test.outcomes),
        "succeeded": len(ok),
        "failures": len(errors) - test.mismatches,
        "mismatches": test.mismatches,
        "streamed": sum(o.stream for o in test.outcomes),
        "by_endpoint": {e: sum(o.endpoint == e for o in test.outcomes) for e in ("chat", "completions")},
        "distinct_requests": len(test.references),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "latency_s": percentiles([o.latency for o in ok]),
        "ttft_s": percentiles([o.ttft for o in streamed]),
        "tpot_s": percentiles(tpot),
        "errors": [f"{o.endpoint} prompt {o.prompt} stream={o.stream}: {o.error}" for o in errors[:20]],
    }


async def served_model(client: httpx.AsyncClient) -> str:
    """The first model the server lists (GET /v1/models)."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_load_test(
    url: str,
    *,
    concurrency: int,
    duration: float,
    max_requests: int | None = None,
    max_tokens: int = 64,
    stream_fraction: float = 0.3,
    completion_fraction: float = 0.25,
    prompts: list[str] | None = None,
    model: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict:
    """Run `concurrency` clients against `url` for `duration` seconds or `max_requests` requests
    and return the summary (`summarize`): counts, failures, mismatches, throughput, percentiles.
    `prompts`: default the Spec-Bench questions or the built-in ones; `model`: default the
    server's first."""
    if concurrency < 1 or duration <= 0 or max_tokens < 1 or (max_requests is not None and max_requests < 1):
        raise ValueError("concurrency, duration, max_tokens and max_requests must be positive")
    prompts = prompts or load_prompts(default_spec_bench(), 16)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        model = model or await served_model(client)
        test = LoadTest(
            client, model=model, prompts=prompts, max_tokens=max_tokens, stream_fraction=stream_fraction,
            completion_fraction=completion_fraction, duration=duration, max_requests=max_requests, seed=seed,
        )  # fmt: skip
        start = time.perf_counter()
        await asyncio.gather(*(test.client_loop() for _ in range(concurrency)))
        summary = summarize(test, time.perf_counter() - start)
    return {"url": url, "model": model, "concurrency": concurrency, "max_tokens": max_tokens, **summary}


def _milliseconds(stats: dict) -> str:
    return ", ".join(f"{k} {'-' if v is None else f'{1000 * v:.0f} ms'}" for k, v in stats.items())


def print_summary(summary: dict) -> None:
    print(
        f"{summary['requests']} requests ({summary['streamed']} streamed, {summary['by_endpoint']}) in "
        f"{summary['elapsed_s']:.1f} s at concurrency {summary['concurrency']}, max_tokens {summary['max_tokens']}"
    )
    print(f"failures: {summary['failures']}; mismatches: {summary['mismatches']} ({summary['distinct_requests']} distinct)")
    print(f"throughput: {summary['requests_per_s']:.2f} requests/s, {summary['completion_tokens_per_s']:.1f} completion tokens/s")
    for name in ("latency", "ttft", "tpot"):
        print(f"{name.upper():8s} {_milliseconds(summary[f'{name}_s'])}")
    for error in summary["errors"]:
        print(f"  error: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.load_test", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients, each with one request in flight (default: 4)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to start new requests for (default: 30)")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after starting this many (default: no limit)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default: 64)")
    parser.add_argument("--stream-fraction", type=float, default=0.3, help="share of streamed requests (default: 0.3)")
    parser.add_argument(
        "--completion-fraction", type=float, default=0.25, help="share sent to /v1/completions, not chat (default: 0.25)"
    )
    parser.add_argument(
        "--num-prompts", type=int, default=16, help="distinct prompts; few make the consistency check bite (default: 16)"
    )
    parser.add_argument("--prompts-jsonl", default=None, help="a Spec-Bench question.jsonl (default: shared/data/spec_bench)")
    parser.add_argument("--model", default=None, help="the model name to send (default: the server's first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default: 0)")
    parser.add_argument("--out", default=None, help="write the summary here as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the load test, print and optionally write the summary; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("stream_fraction", "completion_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if args.num_prompts < 1:
        parser.error("--num-prompts must be >= 1")
    prompts = load_prompts(args.prompts_jsonl or default_spec_bench(), args.num_prompts)
    try:
        summary = asyncio.run(
            run_load_test(
                args.url,
                concurrency=args.concurrency,
                duration=args.duration,
                max_requests=args.max_requests,
                max_tokens=args.max_tokens,
                stream_fraction=args.stream_fraction,
                completion_fraction=args.completion_fraction,
                prompts=prompts,
                model=args.model,
                seed=args.seed,
            )  # fmt: skip
        )
    except ValueError as error:
        parser.error(str(error))
    except httpx.HTTPError as error:
        print(f"cannot reach {args.url}: {error}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.out}")
    return 1 if summary["failures"] or summary["mismatches"] or not summary["succeeded"] else 0


if __name__ == "__main__":
    sys.exit(main())
