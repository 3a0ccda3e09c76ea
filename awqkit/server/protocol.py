"""The OpenAI wire format: request models with their validation, error objects, and response builders.

Requests are validated here and nowhere else: a bad field becomes an :class:`ApiError` (HTTP 400 with an OpenAI
error object naming the field), so the routes in :mod:`awqkit.server.app` only see well-formed requests. Responses
are plain dicts built by the functions at the bottom; they are hot in streaming, so no model objects there.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# ---------------------------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error the client sees as an OpenAI error object ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse: ``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------------------------------
# JSON bodies


def strip_trailing_commas(text: str) -> str:
    """Drop commas that directly precede ``}`` or ``]`` outside strings (``[1, 2,]`` → ``[1, 2]``).

    The guide's curl example (section 2) has such a comma after its ``messages`` array. Strict JSON parsers (and
    vLLM's server) answer it with 400; awqkit accepts it, so the guide works as printed. Nothing else is relaxed.
    """
    out: list[str] = []
    in_string = escaped = False
    last = ""  # the last significant character outside strings
    n = len(text)
    for i, ch in enumerate(text):
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == ",":
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            # only a comma that ends a non-empty list of items: "[1,]" yes; "[,]", "{,}" and "1,,]" stay broken
            if j < n and text[j] in "}]" and last not in ("", "{", "[", ","):
                continue
        out.append(ch)
        if ch == '"':
            in_string = True
        if not ch.isspace():
            last = ch
    return "".join(out)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body into a JSON object, or raise a 400 that says where the JSON is broken.

    Trailing commas before ``}``/``]`` are tolerated (see :func:`strip_trailing_commas`); any other syntax error
    is a 400, as is a body that is valid JSON but not an object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The request body is not valid UTF-8: {exc}.", code="invalid_json") from None
    if not text.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as first:
        try:
            body = json.loads(strip_trailing_commas(text))
        except json.JSONDecodeError:
            raise bad_request(
                f"The request body is not valid JSON: {first.msg} at line {first.lineno} column {first.colno}.",
                code="invalid_json",
            ) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


# ---------------------------------------------------------------------------------------------------------------------
# Requests

# The OpenAI fields awqkit cannot honour. Sending one with a non-default value is a 400 rather than a silent no-op.
_UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "echo", "suffix", "best_of")


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is defined by OpenAI."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by chat and text completions (OpenAI's, plus vLLM's common extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions that clients of vLLM's server send.
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def requested_max_tokens(self) -> int | None:
        """The completion budget the client asked for, or ``None`` to fill the context."""
        return self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (OpenAI accepts one string or a list); empty strings are dropped."""
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        """Whether a streaming response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_unsupported(self) -> None:
        """Raise a 400 for OpenAI features the engine does not implement, when the client actually asks for them."""
        extra = self.model_extra or {}
        for name in _UNSUPPORTED:
            value = extra.get(name)
            if value and not (name == "best_of" and value == 1):
                raise bad_request(f"'{name}' is not supported by awqkit's server; leave it out.", param=name)


class TextContentPart(BaseModel):
    """One part of a message's content list; only text parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A chat message. ``content`` may be a string, a list of text parts, or null (assistant turns)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text, parts joined; a non-text part is a 400."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"Content part of type '{part.type}' is not supported; send text parts only.", param="messages"
                )
            pieces.append(part.text)
        return "".join(pieces)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, one entry per prompt (a batch gives several)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("'prompt' must not be empty.", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


_Model = TypeVar("_Model", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def parse_request(model: type[_Model], body: dict[str, Any]) -> _Model:
    """Validate ``body`` against ``model``; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(x) for x in err.get("loc", ())]
        # Union members add their type name to the location ("stop.list[str]"); keep the field path only.
        path = [x for x in loc if "[" not in x and x.lower() not in _TYPE_TAGS]
        param = ".".join(path) if path else None
        if err.get("type") == "missing":
            message = f"'{param}' is a required field."
        else:
            message = f"Invalid value for '{param}': {err.get('msg')} (got {json.dumps(err.get('input'))[:80]})."
        raise bad_request(message, param=param) from None


# ---------------------------------------------------------------------------------------------------------------------
# Responses


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(
    request_id: str, model: str, created: int, texts: list[str], reasons: list[str | None], usage: dict[str, int]
) -> dict[str, Any]:
    """A complete ``chat.completion`` object."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ],
        "usage": usage,
    }


def completion_response(
    request_id: str, model: str, created: int, texts: list[str], reasons: list[str | None], usage: dict[str, int]
) -> dict[str, Any]:
    """A complete ``text_completion`` object."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ],
        "usage": usage,
    }


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` for one choice."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def completion_chunk(
    request_id: str,
    model: str,
    created: int,
    index: int,
    text: str,
    finish_reason: str | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One streamed ``text_completion`` object for one choice."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


class ContentChunks:
    """Serialises the content chunks of one stream fast: the fixed JSON around the text is built once per request.

    ``content(i, text)`` gives the same SSE event as ``sse(chat_chunk(..., i, {"content": text}))`` (or the
    completion chunk), for a fraction of the cost: at 32 streams of ~300 tokens/s each this runs ~10,000 times a
    second on the event loop, which shares the interpreter with the engine thread.
    """

    def __init__(self, request_id: str, model: str, created: int, chat: bool, include_usage: bool) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            f'data: {{"id":{json.dumps(request_id)},"object":"{obj}","created":{created},'
            f'"model":{json.dumps(model, ensure_ascii=False)},"choices":[{{"index":'
        )
        self._mid = ',"delta":{"content":' if chat else ',"text":'
        usage = ',"usage":null' if include_usage else ""
        self._tail = ("}" if chat else "") + f',"logprobs":null,"finish_reason":null}}]{usage}}}\n\n'

    def content(self, index: int, text: str) -> str:
        """The SSE event carrying ``text`` for choice ``index``."""
        return f"{self._head}{index}{self._mid}{json.dumps(text, ensure_ascii=False)}{self._tail}"


def usage_chunk(request_id: str, model: str, created: int, obj: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the request's usage."""
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying ``data``."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def now() -> int:
    """The ``created`` timestamp: Unix seconds."""
    return int(time.time())
