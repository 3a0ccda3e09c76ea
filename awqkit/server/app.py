"""The FastAPI app: OpenAI-compatible routes on top of the :class:`~awqkit.server.scheduler.Scheduler`.

Routes validate (:mod:`awqkit.server.protocol`), tokenize, check the context budget, and hand sequences to the
scheduler; then they either stream the sink's events as server-sent events or collect them into one response.
Every failure a client can cause is an :class:`~awqkit.server.protocol.ApiError`, rendered as an OpenAI error object;
anything else is a 500 with the same shape, and the process keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from awqkit.errors import AwqkitError, ConfigError
from awqkit.server import protocol as P
from awqkit.server.metrics import CONTENT_TYPE, ServerMetrics
from awqkit.server.scheduler import (
    QueueFullError,
    RequestSink,
    Scheduler,
    SeqEvent,
    Sequence,
    ShuttingDownError,
)

log = logging.getLogger("awqkit.server")

RETRY_AFTER_S = 1  # what a 503 tells the client to wait before retrying
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks whether its client is still there


@dataclass
class ServerState:
    """What the routes share: the engine, its scheduler and the serving options."""

    engine: Any
    scheduler: Scheduler
    metrics: ServerMetrics
    model_name: str
    api_key: str | None
    default_max_tokens: int | None
    shutdown_grace_s: float
    created: int


def create_app(
    engine: Any,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    default_max_tokens: int | None = None,
    shutdown_grace_s: float = 30.0,
) -> FastAPI:
    """Build the OpenAI-compatible app around a loaded :class:`awqkit.engine.Engine`.

    ``served_model_name`` is the name clients must send as ``model`` (default: the engine's ``model_name``);
    ``api_key`` makes every ``/v1`` route require ``Authorization: Bearer <key>``; ``max_queue`` is how many sequences
    may wait for a slot before requests get 503; ``default_max_tokens`` caps a request that sends no ``max_tokens``
    (``None``: the rest of the context, as OpenAI and vLLM do). The engine thread starts with the app's lifespan.
    """
    model_name = served_model_name or str(getattr(engine, "model_name", None) or "awqkit")
    metrics = ServerMetrics(model_name)
    scheduler = Scheduler(engine, max_queue=max_queue, metrics=metrics)
    state = ServerState(
        engine=engine,
        scheduler=scheduler,
        metrics=metrics,
        model_name=model_name,
        api_key=api_key or None,
        default_max_tokens=default_max_tokens,
        shutdown_grace_s=shutdown_grace_s,
        created=P.now(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.drain(0.0)
            await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="awqkit", summary="OpenAI-compatible API for AWQ models", lifespan=lifespan)
    app.state.awqkit = state
    app.add_middleware(_CountResponses, metrics=metrics)
    _install_error_handlers(app)
    _install_routes(app, state)
    return app


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing: metrics middleware, error handlers


class _CountResponses:
    """Pure ASGI middleware counting responses by route and status (safe with streaming, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counting(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.count_request(scope.get("path", ""), status)


def _error_response(err: P.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P.ApiError)
    async def api_error(request: Request, exc: P.ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        err = P.ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
        err.headers = dict(exc.headers or {})
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(P.bad_request(f"Invalid request: {exc.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(P.ApiError(500, f"Internal server error: {exc}", type="server_error"))


# ---------------------------------------------------------------------------------------------------------------------
# Routes


def _install_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    scheduler = state.scheduler

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise P.ApiError(
                401,
                "Invalid or missing API key: send the key given to --api-key as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise P.ApiError(
                404,
                f"The model '{name}' does not exist; this server serves '{state.model_name}' (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def check_accepting() -> None:
        if scheduler.draining:
            raise _unavailable("The server is shutting down; retry against another instance.", "shutting_down")
        if not scheduler.alive:
            raise P.ApiError(503, "The engine is not running; see the server log.", type="server_error")

    @app.get("/health")
    async def health() -> Response:
        if scheduler.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if not scheduler.alive:
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "awqkit",
            "root": state.model_name,
            "parent": None,
            "max_model_len": int(engine.max_model_len),
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = P.parse_request(P.ChatCompletionRequest, P.parse_json_body(await request.body()))
        req.check_unsupported()
        check_model(req.model)
        check_accepting()
        prompt_ids = _render_chat(_tokenizer(engine), req.messages)
        return await _generate(request, state, req, [prompt_ids], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = P.parse_request(P.CompletionRequest, P.parse_json_body(await request.body()))
        req.check_unsupported()
        check_model(req.model)
        check_accepting()
        vocab = int(getattr(engine, "vocab_size", 0) or getattr(engine.config, "vocab_size", 0) or 0)
        prompts: list[list[int]] = []
        for p in req.prompts():
            if isinstance(p, str):
                prompts.append(list(_tokenizer(engine)(p)["input_ids"]))
            else:
                if vocab and any(t < 0 or t >= vocab for t in p):
                    raise P.bad_request(f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
                prompts.append(list(p))
        return await _generate(request, state, req, prompts, chat=False)


def _unavailable(message: str, code: str) -> P.ApiError:
    return P.ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def _tokenizer(engine: Any) -> Any:
    if engine.tokenizer is None:
        raise P.bad_request(
            "This checkpoint has no tokenizer: send /v1/completions with 'prompt' as token ids, or add the tokenizer "
            "files to the checkpoint directory."
        )
    return engine.tokenizer


def _render_chat(tokenizer: Any, messages: list[P.ChatMessage]) -> list[int]:
    """Apply the tokenizer's chat template (with the generation prompt) and tokenize."""
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise on e.g. bad role order
            raise P.bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
    else:  # no template: a plain transcript the model can continue
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# Generation: admission checks, then stream or collect


async def _generate(
    request: Request, state: ServerState, req: P._GenerationRequest, prompts: list[list[int]], chat: bool
) -> Response:
    from awqkit.engine import SamplingParams

    engine = state.engine
    max_model_len = int(engine.max_model_len)
    where = "messages" if chat else "prompt"
    requested = req.requested_max_tokens()
    budgets: list[int] = []
    for ids in prompts:
        if not ids:
            raise P.bad_request("The prompt is empty.", param=where)
        room = max_model_len - len(ids)
        if requested is None:
            max_tokens = room if state.default_max_tokens is None else min(room, state.default_max_tokens)
        else:
            max_tokens = requested
        if max_tokens < 1 or len(ids) + max_tokens > max_model_len:
            raise P.bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in the {where}, {max(max_tokens, 1)} in the "
                f"completion). Reduce the length of the {where} or of max_tokens.",
                param=where,
                code="context_length_exceeded",
            )
        budgets.append(max_tokens)

    total = len(prompts) * req.n
    capacity = state.scheduler.max_queue + int(engine.max_num_seqs)
    if total > capacity:
        raise P.bad_request(
            f"The request asks for {total} sequences; this server holds at most {capacity} at once.", param="n"
        )

    base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    sink = RequestSink(asyncio.get_running_loop())
    seqs: list[Sequence] = []
    for p, (ids, max_tokens) in enumerate(zip(prompts, budgets, strict=True)):
        for i in range(req.n):
            index = p * req.n + i
            try:
                params = SamplingParams(
                    max_new_tokens=max_tokens,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=max(0, req.top_k or 0),
                    repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    seed=None if req.seed is None else req.seed + i,
                    stop=req.stop_strings(),
                    stop_token_ids=tuple(req.stop_token_ids or ()),
                    ignore_eos=req.ignore_eos,
                )
            except (ConfigError, ValueError, TypeError) as exc:
                raise P.bad_request(str(exc)) from None
            seqs.append(Sequence(f"{base}-{index}", index, ids, params, sink))

    try:
        state.scheduler.submit(seqs)
    except QueueFullError:
        raise _unavailable(
            "The server is at capacity (every slot busy and the waiting queue full); retry after a moment.",
            "queue_full",
        ) from None
    except ShuttingDownError:
        raise _unavailable("The server is shutting down; retry against another instance.", "shutting_down") from None

    prompt_tokens = sum(len(ids) for ids in prompts)
    ctx = _Context(base, state.model_name, P.now(), chat, total, prompt_tokens, [s.request_id for s in seqs])
    if req.stream:
        return StreamingResponse(
            _stream(ctx, sink, state.scheduler, req.include_usage()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(ctx, sink, state.scheduler, request)


@dataclass
class _Context:
    request_id: str
    model: str
    created: int
    chat: bool
    total: int  # sequences (choices) in the request
    prompt_tokens: int
    seq_ids: list[str]


def _engine_error(exc: BaseException) -> P.ApiError:
    if isinstance(exc, ConfigError):
        return P.bad_request(str(exc))
    if isinstance(exc, AwqkitError):
        return P.ApiError(500, str(exc), type="server_error")
    return P.ApiError(500, f"The engine failed: {exc}", type="server_error")


async def _collect(ctx: _Context, sink: RequestSink, scheduler: Scheduler, request: Request) -> Response:
    texts = [[] for _ in range(ctx.total)]
    reasons: list[str | None] = [None] * ctx.total
    completion_tokens = 0
    done: set[int] = set()
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
        while len(done) < ctx.total:
            try:
                events = await asyncio.wait_for(sink.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:  # noqa: UP041 - not the builtin TimeoutError before Python 3.11
                events = []
            if loop.time() >= next_check:  # tokens may arrive faster than the poll: check by the clock
                next_check = loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    log.info("%s: client went away; cancelling", ctx.request_id)
                    return Response(status_code=499)
            for ev in events:
                if ev.error is not None:
                    raise _engine_error(ev.error)
                texts[ev.index].append(ev.text)
                if ev.finished:
                    reasons[ev.index] = ev.finish_reason
                    completion_tokens += ev.completion_tokens
                    done.add(ev.index)
    finally:
        if len(done) < ctx.total:
            scheduler.abort(sid for i, sid in enumerate(ctx.seq_ids) if i not in done)
    usage = P.usage_block(ctx.prompt_tokens, completion_tokens)
    build = P.chat_response if ctx.chat else P.completion_response
    return JSONResponse(build(ctx.request_id, ctx.model, ctx.created, ["".join(t) for t in texts], reasons, usage))


async def _stream(ctx: _Context, sink: RequestSink, scheduler: Scheduler, include_usage: bool) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format; ends with ``data: [DONE]``. Leaving early (disconnect) aborts what is left."""
    rid, model, created = ctx.request_id, ctx.model, ctx.created
    done: set[int] = set()
    completion_tokens = 0

    fast = P.ContentChunks(rid, model, created, ctx.chat, include_usage)

    def chunk(index: int, text: str | None, finish: str | None) -> str:
        if finish is None and text is not None:
            return fast.content(index, text)
        if ctx.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            return P.sse(P.chat_chunk(rid, model, created, index, delta, finish, include_usage))
        return P.sse(P.completion_chunk(rid, model, created, index, text or "", finish, include_usage))

    try:
        if ctx.chat:
            yield "".join(
                P.sse(P.chat_chunk(rid, model, created, i, {"role": "assistant", "content": ""}, None, include_usage))
                for i in range(ctx.total)
            )
        while len(done) < ctx.total:
            events: list[SeqEvent] = await sink.queue.get()
            while not sink.queue.empty():  # several engine steps may be ready: send them in one write
                events.extend(sink.queue.get_nowait())
            out: list[str] = []
            for ev in events:
                if ev.error is not None:
                    err = _engine_error(ev.error)
                    out.append(P.sse(err.body()))
                    out.append(P.sse("[DONE]"))
                    yield "".join(out)
                    return
                if ev.text:
                    out.append(chunk(ev.index, ev.text, None))
                if ev.finished:
                    out.append(chunk(ev.index, None, ev.finish_reason))
                    completion_tokens += ev.completion_tokens
                    done.add(ev.index)
            if out:
                yield "".join(out)
        tail = []
        if include_usage:
            obj = "chat.completion.chunk" if ctx.chat else "text_completion"
            usage = P.usage_block(ctx.prompt_tokens, completion_tokens)
            tail.append(P.sse(P.usage_chunk(rid, model, created, obj, usage)))
        tail.append(P.sse("[DONE]"))
        yield "".join(tail)
    finally:
        if len(done) < ctx.total:
            scheduler.abort(sid for i, sid in enumerate(ctx.seq_ids) if i not in done)
