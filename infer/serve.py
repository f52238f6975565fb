"""An OpenAI-compatible HTTP server over `jspec.serve.Engine`: continuous batching with speculation.

    python -m infer.serve                                   # SmolLM2-135M-Instruct, SmartSpec (k_max 3), port 8000
    python -m infer.serve --method chain --k 2 --slots 16   # fixed-k chains
    python -m infer.serve --method ar --port 8080           # plain decoding, the baseline
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "jspec", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

Endpoints: `POST /v1/completions` (prompt: a string or a list of token ids), `POST /v1/chat/completions`
(messages rendered by the tokenizer's chat template), `GET /v1/models`, `GET /health`. Responses have
OpenAI's JSON shapes; `"stream": true` answers with server-sent events (`text/event-stream`): chunks,
the last one carrying finish_reason, a usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. Every bad request gets a 4xx with OpenAI's error body and the server goes on serving.

Differences from OpenAI: `n` must be 1; `stop`, `logprobs`, `echo` and `suffix` are refused (400) rather than
ignored, so that a client never gets an answer that silently disregards them; `model` may be left
out (it then means the served model); `seed` defaults to a fresh random one per request. The EOS
token counts in `usage.completion_tokens` (it is a generated token) but not in the text.

Design: one worker thread owns the engine (`EngineWorker`). It sleeps on a condition variable while
the engine is idle and steps it otherwise; each step's events go to their requests' sinks, which
hand them to the event loop with `loop.call_soon_threadsafe` into a per-request `asyncio.Queue`
(`Generation`). The asyncio side only submits and cancels, both thread-safe. A request whose client
goes away (mid-stream, or while waiting for a non-streamed answer) is cancelled in the engine, which
frees its slot at the next step. `create_app(engine, tokenizer, model_name=...)` builds the app
around any engine (the tests use tiny random models); the app's lifespan starts and stops the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import secrets
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import jspec
from jspec.serve import Engine, Event, calibrate_smartspec

log = logging.getLogger("infer.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
KEEP_FINISHED = 1024  # finished requests the engine remembers (a long-running server must not grow)
MAX_SEED = 2**32  # the engine draws a request's first token from a uint32 seed


# --- errors -------------------------------------------------------------------------------------


class RequestError(Exception):
    """A bad request: answered with `status` and OpenAI's error body."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(message: str, *, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


async def _request_error(request: Request, error: RequestError) -> Response:
    return error_response(error.message, status=error.status, param=error.param, code=error.code)


async def _http_error(request: Request, error: HTTPException) -> Response:
    # Starlette's own 404 (unknown path) and 405 (wrong method), in the same body as ours.
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return error_response(f"{error.detail}: {request.method} {request.url.path}", status=error.status_code, code=code)


async def _server_error(request: Request, error: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(f"internal error: {type(error).__name__}", status=500)


# --- the engine's thread ------------------------------------------------------------------------

Sink = Callable[[Any], None]  # receives Events, or an Exception when the engine failed or stopped


class EngineWorker:
    """Owns `engine` on one thread: steps it while it has work, sleeps on a condition otherwise.

    `submit` and `cancel` may be called from any thread. Each request's events go to the `sink`
    given at submission (called on the worker thread, in order, the last one with a finish reason).
    If a step raises, every open request's sink gets the exception and the worker stops for good
    (`error` is set): the engine's device state may be lost, so nothing more is submitted."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.error: BaseException | None = None
        self._wake = threading.Condition()
        self._open: dict[int, Sink] = {}  # request id -> sink, until its final event
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jspec-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish the current step, fail every open request and join the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_open(RuntimeError("the server is shutting down"))

    def submit(self, prompt: Sequence[int], *, sink: Sink, **params) -> int:
        """`engine.submit(prompt, **params)` (ValueError for a bad argument), then wake the worker.
        RuntimeError when the worker is not running."""
        # Held across submit and registration: the worker dispatches a step's events under the same
        # lock, so it always finds the sink of a request it has stepped.
        with self._wake:
            if self.error is not None or self._stopping or self._thread is None:
                raise RuntimeError("the engine is not running" + (f" (it failed: {self.error!r})" if self.error else ""))
            request_id = self.engine.submit(prompt, **params)
            self._open[request_id] = sink
            self._wake.notify()
        return request_id

    def cancel(self, request_id: int) -> None:
        """Cancel a request that has not finished (a finished one is left alone)."""
        with self._wake:
            if request_id in self._open:
                self.engine.cancel(request_id)
                self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and self.engine.idle:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                events = self.engine.step()
            except Exception as error:  # every waiting client must hear of it
                log.exception("engine step failed; the worker stops")
                self.error = error
                self._fail_open(error)
                return
            self._dispatch(events)

    def _dispatch(self, events: list[Event]) -> None:
        with self._wake:
            deliveries = [(self._open.get(event.request_id), event) for event in events]
            for event in events:
                if event.finish_reason is not None:
                    self._open.pop(event.request_id, None)
        for sink, event in deliveries:  # outside the lock: a sink may be slow or call cancel
            if sink is not None:
                sink(event)

    def _fail_open(self, error: BaseException) -> None:
        with self._wake:
            sinks, self._open = list(self._open.values()), {}
        for sink in sinks:
            sink(error)


class Generation:
    """One submitted request seen from the event loop: `events()` yields its events as they come.

    Create it on the event loop (it captures the running loop). `cancel()` cancels the request in
    the engine unless it already finished; it is safe to call more than once."""

    def __init__(self, worker: EngineWorker, prompt: Sequence[int], **params):
        self.worker = worker
        self.prompt_tokens = len(prompt)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.request_id = worker.submit(prompt, sink=self._put, **params)

    def _put(self, item) -> None:  # the worker's thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The request's events until its final one; raises RuntimeError if the engine failed."""
        while self.finish_reason is None:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finish_reason = "error"
                raise RuntimeError(f"the engine failed: {item!r}") from item
            self.tokens.extend(item.tokens)
            self.finish_reason = item.finish_reason
            yield item

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.worker.cancel(self.request_id)


# --- decoding text ------------------------------------------------------------------------------


class TextStream:
    """Text of a growing token list, as increments: decode all tokens so far, send the new suffix.

    Decoding the whole list keeps multi-byte characters split across tokens whole; text ending in
    U+FFFD (an incomplete character, so far) is held back until a later token completes it."""

    def __init__(self, tokenizer, eos_id: int | None):
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.sent = ""

    def text(self, tokens: Sequence[int], finished: bool) -> str:
        """The whole text of `tokens` (the EOS that ends a finished answer left out)."""
        if finished and tokens and self.eos_id is not None and tokens[-1] == self.eos_id:
            tokens = tokens[:-1]
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def delta(self, tokens: Sequence[int], finished: bool) -> str:
        """What to send now: the text not yet sent (everything left once `finished`)."""
        text = self.text(tokens, finished)
        if not text.startswith(self.sent):  # never seen with byte-level BPE: decoding is prefix-stable
            if finished:
                log.warning("streamed text %r is not a prefix of the answer %r", self.sent[-40:], text[-40:])
            return ""
        if text.endswith("\ufffd") and not finished:
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


# --- parsing requests ---------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def read_json_object(request: Request) -> dict:
    """The request's JSON body, which must be an object (400 otherwise)."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def _check_unsupported(body: dict) -> None:
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise RequestError(f"only n=1 is supported, got n={n!r}", param="n")
    for name in ("stop", "logprobs", "echo", "suffix"):
        if body.get(name) not in (None, False, [], ""):
            raise RequestError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _max_tokens(body: dict, names: Sequence[str], default: int | None) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise RequestError(f"'{name}' must be an integer >= 1, got {value!r}", param=name)
        return value
    return default


def sampling_params(body: dict) -> dict:
    """temperature (default 1, as OpenAI's), top_p (default 1) and seed (default: random) as
    `Engine.submit` arguments; RequestError naming a bad one."""
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number in [0, 2], got {temperature!r}", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be a number in (0, 1], got {top_p!r}", param="top_p")
    seed = body.get("seed")
    if seed is None:  # OpenAI's seed is optional; a fixed default would give equal samples to equal prompts
        seed = secrets.randbelow(MAX_SEED)
    elif not _is_int(seed) or not 0 <= seed < MAX_SEED:
        raise RequestError(f"'seed' must be an integer in [0, 2**32), got {seed!r}", param="seed")
    return {"temperature": float(temperature), "top_p": float(top_p), "seed": seed}


def _stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return stream, bool(options.get("include_usage", False))


def _prompt_ids(prompt, tokenizer) -> list[int]:
    """A completion prompt: a string, a list of token ids, or a list holding one of these."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        return prompt
    raise RequestError("'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content parts must be text parts", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def chat_prompt_ids(messages, tokenizer) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template (ready for the assistant's answer)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", param="messages")
    if tokenizer is None or getattr(tokenizer, "apply_chat_template", None) is None:
        raise RequestError("this model has no chat template: use /v1/completions", code="unsupported_endpoint")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        rendered.append({"role": message["role"], "content": _message_text(message.get("content"), i)})
    try:
        return tokenizer.apply_chat_template(rendered)
    except Exception as error:  # the template's own raise_exception, a missing template, ...
        raise RequestError(f"the chat template refused the messages: {error}", param="messages") from None


# --- the app ------------------------------------------------------------------------------------


class Server:
    """The endpoints, around one `EngineWorker` and a tokenizer."""

    def __init__(self, worker: EngineWorker, tokenizer, model_name: str):
        self.worker, self.tokenizer, self.model_name = worker, tokenizer, model_name
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.created = int(time.time())

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}", param="model",
                code="model_not_found", status=404,
            )  # fmt: skip

    def _submit(self, prompt: list[int], max_tokens: int | None, sampling: dict) -> Generation:
        engine = self.worker.engine
        if max_tokens is None:  # chat without a limit: as much as the engine's max_len leaves
            max_tokens = max(1, engine.max_len - len(prompt))
        try:
            return Generation(self.worker, prompt, max_new_tokens=max_tokens, eos_id=self.eos_id, **sampling)
        except ValueError as error:  # the engine's own check of the request
            code = "context_length_exceeded" if len(prompt) + max_tokens > engine.max_len else None
            raise RequestError(str(error), code=code) from None
        except RuntimeError as error:
            raise RequestError(str(error), code="engine_unavailable", status=503) from None

    async def completions(self, request: Request) -> Response:
        body = await read_json_object(request)
        self._check_model(body)
        _check_unsupported(body)
        if "prompt" not in body:
            raise RequestError("'prompt' is required", param="prompt")
        prompt = _prompt_ids(body["prompt"], self.tokenizer)
        max_tokens = _max_tokens(body, ("max_tokens",), DEFAULT_COMPLETION_MAX_TOKENS)
        return await self._answer(request, body, prompt, max_tokens, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json_object(request)
        self._check_model(body)
        _check_unsupported(body)
        if "messages" not in body:
            raise RequestError("'messages' is required", param="messages")
        max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None)
        prompt = chat_prompt_ids(body["messages"], self.tokenizer)
        return await self._answer(request, body, prompt, max_tokens, chat=True)

    async def _answer(self, request: Request, body: dict, prompt: list[int], max_tokens: int | None, *, chat: bool) -> Response:
        # Everything is validated before submitting: a request the engine accepts is answered 200.
        sampling = sampling_params(body)
        stream, include_usage = _stream_options(body)
        generation = self._submit(prompt, max_tokens, sampling)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if stream:
            chunks = self._stream(generation, response_id, chat=chat, include_usage=include_usage)
            return CancellingStreamingResponse(
                chunks, generation, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self._whole(request, generation, response_id, chat=chat)

    def _usage(self, generation: Generation) -> dict:
        n = len(generation.tokens)
        return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": n, "total_tokens": generation.prompt_tokens + n}

    async def _whole(self, request: Request, generation: Generation, response_id: str, *, chat: bool) -> Response:
        try:
            async with _cancel_on_disconnect(request, generation):
                async for _ in generation.events():
                    pass
        except RuntimeError as error:
            return error_response(str(error), status=503, code="engine_unavailable")
        if generation.finish_reason == "cancelled":  # the client left; nobody reads this
            return error_response("the request was cancelled", status=499)
        text = TextStream(self.tokenizer, self.eos_id).text(generation.tokens, finished=True)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = generation.finish_reason
        return JSONResponse(
            {
                "id": response_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [choice],
                "usage": self._usage(generation),
            }
        )

    async def _stream(self, generation: Generation, response_id: str, *, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer. Cancels the request if it is closed early."""
        head = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if include_usage:
            head["usage"] = None  # as OpenAI: null on every chunk but the last

        def chunk(text: str | None, finish_reason: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return _sse(head | {"choices": [choice]})

        text = TextStream(self.tokenizer, self.eos_id)
        try:
            if chat:
                yield chunk("", None, first=True)
            async for event in generation.events():
                finished = event.finish_reason is not None
                if event.finish_reason == "cancelled":
                    return
                delta = text.delta(generation.tokens, finished)
                if delta:
                    yield chunk(delta, None)
                if finished:
                    yield chunk(None, event.finish_reason)
            if include_usage:
                yield _sse(head | {"choices": [], "usage": self._usage(generation)})
            yield "data: [DONE]\n\n"
        except RuntimeError as error:  # the engine failed mid-stream: say so in the stream
            yield _sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": "engine_unavailable"}})
        finally:  # closed early (the client went away): free the slot
            generation.cancel()

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "jspec"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if not self.worker.running:
            return JSONResponse({"status": "error", "error": repr(self.worker.error)}, status_code=503)
        return JSONResponse({"status": "ok"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class CancellingStreamingResponse(StreamingResponse):
    """A StreamingResponse that cancels its generation however the response ends. The body
    generator's `finally` does it too, but only once the generator is closed, which a generator
    suspended at a `yield` when the client left may not be until it is garbage-collected."""

    def __init__(self, content, generation: Generation, **kwargs):
        super().__init__(content, **kwargs)
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()
            with contextlib.suppress(Exception):  # close the generator now rather than at garbage collection
                await self.body_iterator.aclose()


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, generation: Generation):
    """Cancel `generation` if the client disconnects before the body completes: a non-streamed
    request otherwise holds its slot until max_tokens for a client that is gone."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                generation.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        generation.cancel()


def create_app(engine: Engine, tokenizer, *, model_name: str = "jspec") -> Starlette:
    """The Starlette app serving `engine`: its lifespan starts the engine's worker thread and
    stops it. `tokenizer`: encode / decode / apply_chat_template and eos_id (a
    `jspec.models.gguf_tokenizer.ChatTokenizer`), or None to accept token-id prompts only."""
    worker = EngineWorker(engine)
    server = Server(worker, tokenizer, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    handlers = {RequestError: _request_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.worker, app.state.engine = worker, engine
    return app


# --- the command line ---------------------------------------------------------------------------


class PlainTokenizer:
    """A `tokenizers.Tokenizer` (the code models', a Hugging Face target's) as the server uses it:
    no chat template, no EOS."""

    eos_id = None
    apply_chat_template = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def build_parser() -> argparse.ArgumentParser:
    from infer.models import add_model_arguments

    parser = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--method", choices=("ar", "chain", "smartspec"), default="smartspec",
        help="ar: plain decoding; chain: Chain(--k); smartspec: SmartSpec up to --k drafts, by goodput (default)",
    )  # fmt: skip
    parser.add_argument("--k", type=int, default=3, help="chain length, or SmartSpec's k_max (default: 3)")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded at once, the compiled batch (default: 8)")
    parser.add_argument(
        "--max-len", type=int, default=1024, help="the most tokens a request holds, prompt + answer (default: 1024)"
    )
    parser.add_argument("--rounds-per-step", type=int, default=4, help="rounds per compiled step between admissions (default: 4)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--model-name", default="jspec", help="the model name clients send (default: jspec)")
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling every program before serving")
    return parser


def build_engine(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Engine, Any, str]:
    """(engine, tokenizer, description) from the command line."""
    from infer.models import chat_tokenizer, models_from_args, text_tokenizer

    target, drafter, description = models_from_args(parser, args)
    if args.method == "ar":
        strategy, drafter = jspec.Autoregressive(), None
    elif args.method == "chain":
        strategy = jspec.Chain(k=args.k)
    else:  # its cost model is measured on this engine before serving (`main`: calibrate_smartspec)
        strategy = jspec.SmartSpec(k_max=args.k, t_target=(1.0,) * (args.k + 1))
    try:
        engine = Engine(
            target, drafter, strategy, slots=args.slots, max_len=args.max_len, rounds_per_step=args.rounds_per_step,
            seed=args.seed, keep_finished=KEEP_FINISHED,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    tokenizer = chat_tokenizer(args)
    if tokenizer is None and (plain := text_tokenizer(args)) is not None:
        tokenizer = PlainTokenizer(plain)
    return engine, tokenizer, f"{description}\nstrategy: {strategy!r}; {args.slots} slots, max_len {args.max_len}"


def warmup(engine: Engine) -> float:
    """Compile every program (the step and each prompt width's prefill); returns the seconds."""
    start = time.perf_counter()
    engine.warm_up()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Build the models and serve them until interrupted."""
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine, tokenizer, description = build_engine(parser, args)
    print(description, flush=True)
    if tokenizer is None:
        print("no tokenizer for these models: prompts must be token ids, /v1/chat/completions is refused", flush=True)
    if not args.no_warmup:
        print(f"warm-up (compiling): {warmup(engine):.1f} s", flush=True)
    if isinstance(engine.strategy, jspec.SmartSpec):  # the cost of a round at each k, on this engine
        round_ms = [round(1000 * float(t), 1) for t in calibrate_smartspec(engine)]
        print(f"SmartSpec: a round at k = 0..{args.k} costs {round_ms} ms with {args.slots} busy slots", flush=True)
    app = create_app(engine, tokenizer, model_name=args.model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
