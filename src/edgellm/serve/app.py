"""`edgellm serve`: an OpenAI-compatible HTTP API over one loaded build (Starlette, run by uvicorn).

    GET  /health                 503 while the model loads, 200 when ready (public with --api-key)
    GET  /metrics                Prometheus text (serve/metrics.py)
    GET  /v1/models              the build, and its LoRA adapters (a request's model may name one)
    GET  /lora-adapters          llama.cpp's list: a request's "lora": [{"id", "scale"}] picks one by id
    POST /v1/chat/completions    streamed (server-sent events) or not
    POST /v1/completions

Requests are parsed and tokenized here, on the event loop; generation runs in the scheduler's
thread (serve/scheduler.py), whose events each handler turns into OpenAI's response objects.
Every error is OpenAI's JSON error body with its HTTP status, and ends only that request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeLLMError
from ..runtime.sampling import SamplingParams
from .metrics import Metrics
from .protocol import FINISH, ApiError, ChatRequest, CompletionRequest, ValidationError, describe, new_id, now, usage
from .scheduler import Job, Scheduler

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    model_dir: Path
    parallel: int = 4
    api_key: str | None = None
    alias: str | None = None
    draft: Path | None = None
    lookup: int | None = None
    draft_max: int = 4
    threads: int | None = None
    max_body_bytes: int = 4 * 2**20
    cache_bytes: int = 256 << 20  # the prefix store's limit (prefix_store.py); 0: none


class Server:
    """The loaded model and its scheduler, made in a thread at startup (so /health answers 503
    meanwhile). A load that fails is kept in `failed`, and on_failure (the CLI: stop uvicorn) called."""

    def __init__(self, options: ServeOptions, on_failure: Callable[[], None] = lambda: None):
        self.options = options
        self.name = options.alias or Path(options.model_dir).name
        self.metrics = Metrics()
        self.model = self.draft_model = self.scheduler = self.grammars = None
        self.ready = threading.Event()
        self.failed: str | None = None
        self.on_failure = on_failure
        self.created = now()

    def load(self) -> None:
        import edgellm

        from .structured import Grammars

        o = self.options
        try:
            self.model = edgellm.load(o.model_dir, threads=o.threads)
            drafters = None
            if o.lookup is not None or o.draft is not None:
                if o.draft_max < 1:
                    raise EdgeLLMError(f"--draft-max {o.draft_max}: draft at least 1 token")
                if o.draft is not None:
                    self.draft_model = edgellm.load(o.draft, threads=o.threads)
                # one drafter per session: a draft model's drafters each open a session on the one draft model
                drafters = lambda: self.model.drafter(self.draft_model, o.lookup)  # noqa: E731
            for name in self.model.adapters.names:  # placed now, not on the scheduler's thread at first use
                self.model.adapters.inputs(name)
            codec = self.model.codec
            self.grammars = Grammars(codec.tokenizer.to_str(), self.model.engine.spec.vocab_size, sorted(codec.eos_ids))
            self.scheduler = Scheduler(self.model, o.parallel, self.metrics, drafters, o.draft_max, o.cache_bytes)
        except EdgeLLMError as e:
            self.failed = str(e)
            self.close()
            self.on_failure()
            return
        self.ready.set()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.draft_model is not None:
            self.draft_model.close()
        if self.model is not None:
            self.model.close()

    # ---- requests -------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.name, *self.model.adapters.names):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.name!r}", "model",
                           "model_not_found")

    def adapter(self, request) -> tuple[str, float] | None:
        """The LoRA adapter a request asks for: llama.cpp's "lora" list (one adapter with a
        non-zero scale at most), or an adapter's name as the model; None: the base model."""
        names = self.model.adapters.names
        if request.lora is not None:
            for choice in request.lora:
                if choice.id >= len(names):
                    raise ApiError(400, f"lora id {choice.id}: this server has {len(names)} LoRA adapters "
                                   "(GET /lora-adapters)", "lora")
            chosen = [(names[c.id], c.scale) for c in request.lora if c.scale != 0]
            if len(chosen) > 1:
                raise ApiError(400, "one LoRA adapter per request (a session runs one branch set)", "lora")
            return chosen[0] if chosen else None
        return (request.model, 1.0) if request.model in names and request.model != self.name else None

    def job(self, request, ids: list[int]) -> Job:
        """A Job for a parsed request over prompt ids, checked against the context."""
        context = self.model.engine.spec.max_num_tokens
        if len(ids) == 0:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) >= context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context holds {context}",
                           "messages" if isinstance(request, ChatRequest) else "prompt", "context_length_exceeded")
        limit = request.answer_limit
        if limit is not None and len(ids) + limit > context:
            raise ApiError(400, f"the prompt's {len(ids)} tokens and max_tokens {limit} exceed this model's context of "
                           f"{context} tokens", "max_tokens", "context_length_exceeded")
        # a chat prompt's negative ids are its images' rows (the server made them); a client's never are
        lowest = -(1 << 62) if isinstance(request, ChatRequest) else 0
        if any(t < lowest or t >= self.model.engine.spec.vocab_size for t in ids):
            raise ApiError(400, f"a prompt token id is outside the vocabulary (0..{self.model.engine.spec.vocab_size - 1})",
                           "prompt")
        constrained, schema = request.schema()
        constraint = None
        if constrained:
            try:
                constraint = self.grammars.for_schema(schema)
            except EdgeLLMError as e:
                raise ApiError(400, str(e), "response_format") from None
        sampling = SamplingParams(request.temperature, request.top_k, request.top_p, request.seed)
        return Job(list(ids), limit or context - len(ids), sampling, tuple(request.stop or ()), request.ignore_eos,
                   constraint, adapter=self.adapter(request), loop=asyncio.get_running_loop())


def create_app(server: Server) -> Starlette:
    options = server.options

    def guarded(handler, public: bool = False, needs_model: bool = True):
        async def endpoint(request: Request) -> Response:
            try:
                if options.api_key and not public:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                                       "invalid_api_key", "authentication_error")
                if needs_model and not server.ready.is_set():
                    raise ApiError(503, "the model is loading", None, None, "unavailable_error")
                return await handler(request)
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except Exception:  # a bug: this request gets a 500, the server keeps serving
                log.exception("%s %s failed", request.method, request.url.path)
                error = ApiError(500, "internal server error (see the server log)", kind="server_error")
                return JSONResponse(error.body(), status_code=500)

        return endpoint

    async def health(request: Request) -> Response:
        if server.failed:
            return JSONResponse({"status": "error", "error": server.failed}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    async def models(request: Request) -> Response:
        context = server.model.engine.spec.max_num_tokens
        listed = [{"id": server.name, "object": "model", "created": server.created, "owned_by": "edgellm",
                   "context_length": context}]
        listed += [{"id": name, "object": "model", "created": server.created, "owned_by": "edgellm",
                    "parent": server.name, "context_length": context} for name in server.model.adapters.names]
        return JSONResponse({"object": "list", "data": listed})

    async def lora_adapters(request: Request) -> Response:
        """llama.cpp's list: a request's "lora" entries name adapters by these ids."""
        adapters = server.model.adapters
        return JSONResponse([{"id": i, "name": name, "path": adapters.available[name].get("source"), "scale": 0.0}
                             for i, name in enumerate(adapters.names)])

    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatRequest, options.max_body_bytes)
        server.check_model(body.model)
        model = server.model
        messages, images = body.chat_messages(vision=model.config.vision is not None)
        try:  # off the event loop: encoding an image takes a while, and other requests are being answered
            prompts, _ = await asyncio.to_thread(model.encode_images, images) if images else ([], 0.0)
        except EdgeLLMError as e:  # not an image, too large, ...
            raise ApiError(400, f"messages: {e}", "messages") from None
        try:
            ids = model.encode(model.codec.render_chat(messages), prompts, special=False)
        except EdgeLLMError as e:  # text that is not UTF-8; markers that do not match the images
            raise ApiError(400, str(e), "messages") from None
        except Exception as e:  # the model's own chat template failed on these messages
            raise ApiError(400, f"the chat template failed on these messages: {e}", "messages") from None
        return await _answer(request, server, body, ids, chat=True)

    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest, options.max_body_bytes)
        server.check_model(body.model)
        prompt = body.prompt
        try:
            ids = server.model.prompt_ids(prompt) if isinstance(prompt, str) else list(prompt)
        except EdgeLLMError as e:
            raise ApiError(400, str(e), "prompt") from None
        return await _answer(request, server, body, ids, chat=False)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(),
                            status_code=exc.status_code)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=server.load, name="edgellm-load", daemon=True).start()
        yield
        await asyncio.to_thread(server.close)

    return Starlette(
        routes=[
            Route("/health", guarded(health, public=True, needs_model=False)),
            Route("/metrics", guarded(metrics, needs_model=False)),
            Route("/v1/models", guarded(models)),
            Route("/lora-adapters", guarded(lora_adapters)),
            Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
            Route("/v1/completions", guarded(completions), methods=["POST"]),
        ],
        exception_handlers={HTTPException: not_found},
        lifespan=lifespan,
    )


async def _parse(request: Request, kind, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit} (--max-body)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes (--max-body)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise describe(e) from None


async def _answer(request: Request, server: Server, body, ids: list[int], chat: bool) -> Response:
    job = server.job(body, ids)
    server.scheduler.submit(job)
    ident, created = new_id("chatcmpl" if chat else "cmpl"), now()
    kind = "chat.completion" if chat else "text_completion"
    if body.stream:
        return StreamingResponse(_stream(server, job, ident, created, kind, chat, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        while True:
            try:
                event, value = await asyncio.wait_for(job.events.get(), 0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    server.scheduler.nudge()
                    return Response(status_code=499)
                continue
            if event == "error":
                raise value
            if event == "done":
                break
    except asyncio.CancelledError:
        job.cancel()
        server.scheduler.nudge()
        raise
    result = value
    finish = FINISH.get(result.finish_reason, "stop")
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
    return JSONResponse({"id": ident, "object": kind, "created": created, "model": server.name, "choices": [choice],
                         "usage": usage(result.prompt_tokens, result.gen_tokens, result.cached_tokens)})


async def _stream(server: Server, job: Job, ident: str, created: int, kind: str, chat: bool, include_usage: bool):
    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _event({"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                       "model": server.name, "choices": [choice]})

    # a text chunk is the same envelope every time: made once, only the text is encoded per chunk
    head, tail = chunk("\0").split(json.dumps("\0"))
    done = False
    try:
        if chat:
            yield chunk(None, role=True)
        while True:
            event, value = await job.events.get()
            if event == "text":  # (the scheduler gathers pieces: Job.text)
                yield head + json.dumps(value, ensure_ascii=False) + tail
            elif event == "error":
                done = True
                yield _event(value.body())
                break
            else:
                done = True
                yield chunk(None, FINISH.get(value.finish_reason, "stop"))
                if include_usage:
                    yield _event({"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                  "model": server.name, "choices": [],
                                  "usage": usage(value.prompt_tokens, value.gen_tokens, value.cached_tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client left (the response was cancelled) before the answer ended
            job.cancel()
            server.scheduler.nudge()


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
