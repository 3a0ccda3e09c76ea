"""The OpenAI-compatible server (awqkit.server), through real server processes on 127.0.0.1.

``server`` runs the embedded default (SmolLM2-135M-Instruct, RTN g64; 8 slots) for the whole module: the guide's
curl and openai code, fields, streaming, 16 concurrent streams, errors. Two more run a tiny random Llama with
SmolLM2's tokenizer, which loads in a second and decodes fast, where only the serving matters: ``strict``
(``--api-key``, one slot, a queue of one) for the API key, 503 and disconnects, and a short-lived one that is shut
down with SIGTERM mid-stream. A small fake engine checks the scheduler's admission logic in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "reference" / "qwen-awq-guide.md"
MODEL = "smollm2-awq"
KEY = "sk-test-awqkit"
GUIDE_MODEL = "Qwen/Qwen2-7B-Instruct-AWQ"

# Section 2 of the guide, verbatim. Only the port and the model name are changed when they run.
GUIDE_CURL = """\
curl http://localhost:8000/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "Qwen/Qwen2-7B-Instruct-AWQ",
    "messages": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Tell me something about large language models."}
    ],
  }'
"""

GUIDE_PYTHON = """\
from openai import OpenAI

openai_api_key = "EMPTY"
openai_api_base = "http://localhost:8000/v1"

client = OpenAI(
    api_key=openai_api_key,
    base_url=openai_api_base,
)

chat_response = client.chat.completions.create(
    model="Qwen/Qwen2-7B-Instruct-AWQ",
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me something about large language models."},
    ]
)
print("Chat response:", chat_response)
"""

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for 'happy'.",
    "What does a compiler do?",
    "Who wrote Romeo and Juliet?",
    "List two uses of copper.",
    "What is the boiling point of water?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Suggest a name for a puppy.",
    "What is photosynthesis?",
    "Count from one to five.",
]


# ---------------------------------------------------------------------------------------------------------------------
# Server processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m awqkit.server CKPT ...`` on a free port, its output in a log file."""

    def __init__(self, checkpoint: Path, log_path: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "awqkit.server", str(checkpoint), "--port", str(self.port), *args]
        self._log = open(log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def build_tiny_checkpoint(smollm_rtn_checkpoint: Path, out: Path) -> Path:
    """A 2-layer random Llama (hidden 64) over SmolLM2's vocabulary, RTN g32, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from awqkit import QuantConfig, quantize_rtn
    from awqkit.formats.save import save_checkpoint

    tok = AutoTokenizer.from_pretrained(smollm_rtn_checkpoint)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    path = save_checkpoint(model, out / "tiny-llama-smoltok", quant)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def servers(smollm_rtn_checkpoint, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")
    # three servers and the tests share the CPU: one PyTorch thread each (two would wait on each other for cores)
    common = ("--served-model-name", MODEL, "--log-level", "warning", "--cpu-threads", "1")
    # the embedded default loads slowest: start it first, build the tiny model while it loads
    open_server = ServerProcess(
        smollm_rtn_checkpoint,
        logs / "open.log",
        *common,
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--default-max-tokens",
        "24",
    )
    strict = term = None
    try:
        tiny = build_tiny_checkpoint(smollm_rtn_checkpoint, tmp_path_factory.mktemp("tiny"))
        strict = ServerProcess(
            tiny, logs / "strict.log", *common, "--api-key", KEY, "--max-num-seqs", "1", "--max-queue", "1"
        )
        # the server that test_sigterm_while_streaming_exits_cleanly shuts down, started now to overlap the loads
        term = ServerProcess(
            tiny,
            logs / "term.log",
            *("--served-model-name", MODEL, "--max-num-seqs", "2", "--shutdown-grace", "2", "--cpu-threads", "1"),
        )
        strict.wait_ready()
        open_server.wait_ready()
        yield open_server, strict, term
    finally:
        codes = (open_server.stop(), strict.stop() if strict else 0)
        if term is not None:
            term.stop()
    assert codes == (0, 0), f"servers did not exit cleanly: {codes}\n{open_server.log()}\n{strict.log()}"


@pytest.fixture(scope="module")
def term_server(servers) -> ServerProcess:
    return servers[2]


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers[0]


@pytest.fixture(scope="module")
def strict(servers) -> ServerProcess:
    return servers[1]


def _chat(url: str, messages, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _sse_events(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def _metric(url: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples (those whose labels contain ``label``)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------------------------------
# The guide, verbatim


def _guide_blocks() -> str:
    return "\n".join(line.strip() for line in GUIDE.read_text().splitlines())


def test_guide_snippets_are_verbatim():
    guide = _guide_blocks()
    for snippet in (GUIDE_CURL, GUIDE_PYTHON):
        assert "\n".join(line.strip() for line in snippet.splitlines()) in guide


def test_guide_curl(server):
    # The guide's JSON has a trailing comma after "messages": strict JSON (and vLLM) reject it; awqkit accepts it.
    body = GUIDE_CURL.split("-d '", 1)[1].rsplit("'", 1)[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    cmd = GUIDE_CURL.replace("localhost:8000", f"localhost:{server.port}").replace(GUIDE_MODEL, MODEL)
    out = subprocess.run(
        cmd.rstrip() + " -s -w '\\n%{http_code}'", shell=True, capture_output=True, text=True, timeout=120
    )
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "200", out.stdout + out.stderr
    resp = json.loads(payload)
    assert resp["object"] == "chat.completion" and resp["model"] == MODEL
    choice = resp["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = resp["usage"]
    assert usage["completion_tokens"] <= 24  # --default-max-tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"] > 10


def test_guide_openai_client(server):
    code = GUIDE_PYTHON.replace("localhost:8000", f"localhost:{server.port}").replace(GUIDE_MODEL, MODEL)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Chat response: ChatCompletion(id='chatcmpl-")
    assert f"model='{MODEL}'" in out.stdout and "role='assistant'" in out.stdout
    assert re.search(r"usage=CompletionUsage\(completion_tokens=\d+, prompt_tokens=\d+", out.stdout)


# ---------------------------------------------------------------------------------------------------------------------
# Endpoints and fields


def test_models_health_metrics(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "awqkit_http_requests_total",
        "awqkit_prompt_tokens_total",
        "awqkit_generation_tokens_total",
        "awqkit_time_to_first_token_seconds_bucket",
        "awqkit_inter_token_latency_seconds_bucket",
        "awqkit_num_requests_running",
        "awqkit_num_requests_waiting",
    ):
        assert name in text, name
    assert 'awqkit_http_requests_total{route="/v1/models",status="200"}' in text


def test_chat_fields_and_usage(server):
    tok_prompt = _user("Name a fruit.")
    r = _chat(
        server.url,
        tok_prompt,
        max_tokens=10,
        max_completion_tokens=4,  # wins over max_tokens
        temperature=0,
        top_p=0.9,
        top_k=40,
        n=2,
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        user="tester",
        ignore_eos=True,
    )
    assert r.status_code == 200, r.text
    resp = r.json()
    assert [c["index"] for c in resp["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in resp["choices"])
    assert resp["choices"][0]["message"]["content"] == resp["choices"][1]["message"]["content"]  # greedy
    usage = resp["usage"]
    assert usage["completion_tokens"] == 8  # 2 choices x 4 tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8

    # a stop string taken from the greedy answer ends it there, the stop string not included
    full = _chat(server.url, tok_prompt, max_tokens=8, temperature=0, ignore_eos=True).json()
    text = full["choices"][0]["message"]["content"]
    cut = len(text) // 2
    stop = text[cut : cut + 3]
    assert len(stop) == 3
    r = _chat(server.url, tok_prompt, max_tokens=8, temperature=0, stop=[stop], ignore_eos=True)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text[: text.index(stop)]


def test_chat_stream_matches_non_stream(server):
    messages = _user("Tell me about the moon.")
    plain = _chat(server.url, messages, max_tokens=12, temperature=0).json()
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *body_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in body_chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in body_chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert body_chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks[:-1])


def test_openai_client_stream_with_usage(server):
    from openai import OpenAI

    client = OpenAI(api_key="EMPTY", base_url=f"{server.url}/v1")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_user("Say hello."),
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    # without include_usage there is no usage chunk
    chunks = list(client.chat.completions.create(model=MODEL, messages=_user("Hi"), max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_completions(server, smollm_rtn_checkpoint):
    from openai import OpenAI

    client = OpenAI(api_key="EMPTY", base_url=f"{server.url}/v1")
    resp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text and resp.usage.completion_tokens <= 5
    batch = client.completions.create(
        model=MODEL, prompt=["The capital of France is", "One, two,"], max_tokens=5, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == resp.choices[0].text
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm_rtn_checkpoint)("One, two,")["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == batch.choices[1].text
    stream = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5, temperature=0, stream=True, n=2)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [batch.choices[1].text] * 2


# ---------------------------------------------------------------------------------------------------------------------
# Continuous batching: 16 concurrent streams, each equal to the same prompt run alone


def test_16_concurrent_streams_are_correct_and_separate(server):
    solo = []
    for p in PROMPTS:
        r = _chat(server.url, _user(p), max_tokens=6, temperature=0)
        assert r.status_code == 200, r.text
        solo.append(r.json()["choices"][0]["message"]["content"])
    assert len(set(solo)) >= 12, solo  # the prompts really give different answers

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[str, str, int]:
        body = {"model": MODEL, "messages": _user(prompt), "max_tokens": 6, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        text, ids, usage = "", set(), None
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                ids.add(chunk["id"])
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content", "")
                else:
                    usage = chunk["usage"]
        assert len(ids) == 1
        return text, ids.pop(), usage["completion_tokens"]

    async def all_at_once():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    results = asyncio.run(all_at_once())
    assert [t for t, _, _ in results] == solo
    assert len({rid for _, rid, _ in results}) == 16
    assert all(1 <= n <= 6 for _, _, n in results)
    _wait_for(lambda: _metric(server.url, "awqkit_num_requests_running") == 0, 5, "the batch to empty")


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", b'{"model": "smollm2-awq", "messages": [', 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", b"", 400, None),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": -0.5},
            400,
            "temperature",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
            400,
            "max_tokens",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "seed": -3}, 400, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 600}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 600}, 400, "messages"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    kwargs = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{server.url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


def test_context_length_error_names_the_numbers(server):
    r = _chat(server.url, _user("x " * 600), max_tokens=5)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "512" in err["message"]


def test_routes_and_methods_and_server_survives(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"\xff\xfe", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert _chat(server.url, _user("Hi"), max_tokens=2).status_code == 200
    assert _metric(server.url, "awqkit_http_requests_total") > 0


def test_openai_client_raises_typed_errors(server):
    import openai

    client = openai.OpenAI(api_key="EMPTY", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=_user("x"), temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=_user("x"))


# ---------------------------------------------------------------------------------------------------------------------
# API key, queue full (503), client disconnects (strict server: 1 slot, queue of 1)

AUTH = {"Authorization": f"Bearer {KEY}"}


def test_api_key(strict):
    body = {"model": MODEL, "messages": _user("Hi"), "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{strict.url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{strict.url}/v1/models").status_code == 401
    assert httpx.get(f"{strict.url}/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{strict.url}/health").status_code == 200  # probes need no key
    r = httpx.post(f"{strict.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text

    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="EMPTY", base_url=f"{strict.url}/v1", max_retries=0).models.list()
    models = openai.OpenAI(api_key=KEY, base_url=f"{strict.url}/v1").models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_queue_full_503_and_disconnects_free_slots(strict):
    url = strict.url
    long_body = {"model": MODEL, "messages": _user("Tell a long story."), "max_tokens": 4000, "ignore_eos": True}

    def gauges() -> tuple[float, float]:
        return _metric(url, "awqkit_num_requests_running"), _metric(url, "awqkit_num_requests_waiting")

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            # A: a long stream takes the only slot.
            a = client.stream("POST", f"{url}/v1/chat/completions", json={**long_body, "stream": True})
            ra = await a.__aenter__()
            lines = ra.aiter_lines()
            while not (await lines.__anext__()).startswith('data: {"id"'):
                pass
            # B: a non-streaming request waits in the queue (its only place).
            b = asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=long_body))
            await asyncio.to_thread(_wait_for, lambda: gauges() == (1, 1), 10, "B to wait")
            # C: no room anywhere -> 503 with Retry-After.
            rc = await client.post(f"{url}/v1/chat/completions", json={**long_body, "max_tokens": 2})
            assert rc.status_code == 503, rc.text
            assert rc.headers["retry-after"] == "1" and rc.json()["error"]["code"] == "queue_full"
            # Both clients go away: the queued one and the streaming one are cancelled at once.
            b.cancel()
            await ra.aclose()
            await a.__aexit__(None, None, None)

    aborted_before = _metric(url, "awqkit_request_success_total", 'finished_reason="abort"')
    asyncio.run(scenario())
    _wait_for(lambda: gauges() == (0, 0), 10, "the slot and the queue to free")
    assert _metric(url, "awqkit_request_success_total", 'finished_reason="abort"') == aborted_before + 2
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json={**long_body, "max_tokens": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and time.monotonic() - t0 < 10


# ---------------------------------------------------------------------------------------------------------------------
# Graceful shutdown


def test_sigterm_while_streaming_exits_cleanly(term_server):
    srv = term_server
    try:
        srv.wait_ready()
        results: dict[str, list[str]] = {}

        def stream(name: str, max_tokens: int, started: threading.Event) -> None:
            body = {"model": MODEL, "messages": _user("Write a poem."), "max_tokens": max_tokens, "ignore_eos": True}
            body["stream"] = True
            events = []
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()
            results[name] = events

        started = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=stream, args=("short", 40, started[0])),  # finishes within the grace period
            threading.Thread(target=stream, args=("long", 4000, started[1])),  # cut at the end of the grace period
        ]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections once shutting down
            httpx.get(f"{srv.url}/health", timeout=2)
        for t in threads:
            t.join(60)
        assert srv.proc.wait(30) == 0, srv.log()
        assert time.monotonic() - t0 < 15
    finally:
        srv.stop()
    for name, reason in (("short", "length"), ("long", "abort")):
        events = results[name]
        assert events[-1] == "[DONE]", (name, events[-3:])
        final = json.loads(events[-2])["choices"][0]
        assert final["finish_reason"] == reason, (name, final)
    assert "draining" in srv.log()


# ---------------------------------------------------------------------------------------------------------------------
# The scheduler's logic, in-process, on a small fake engine (the HTTP tests above use the real one)


@dataclass
class _Out:
    request_id: str
    new_token_ids: list
    text_delta: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class _FakeEngine:
    """Slots and steps only: each step gives every running request one token ``"x"``."""

    def __init__(self, slots: int) -> None:
        self.max_num_seqs = slots
        self.running: dict[str, list] = {}
        self.max_batch = 0
        self.admission_log: list[str] = []

    def add_request(self, rid, ids, params):
        assert len(self.running) < self.max_num_seqs, "admitted without a free slot"
        self.running[rid] = [params.max_new_tokens, 0, len(ids)]
        self.admission_log.append(rid)

    def abort(self, rid):
        self.running.pop(rid, None)

    def num_free_slots(self):
        return self.max_num_seqs - len(self.running)

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        time.sleep(0.002)
        self.max_batch = max(self.max_batch, len(self.running))
        outs = []
        for rid, st in list(self.running.items()):
            st[1] += 1
            done = st[1] >= st[0]
            outs.append(_Out(rid, [1], "x", done, "length" if done else None, st[2], st[1]))
            if done:
                del self.running[rid]
        return outs


def test_scheduler_admits_into_running_batch_and_frees_slots():
    from awqkit.server.scheduler import RequestSink, Scheduler, Sequence

    @dataclass
    class Params:
        max_new_tokens: int

    async def run() -> None:
        engine = _FakeEngine(slots=3)
        sched = Scheduler(engine, max_queue=10)
        sched.start()
        sinks = [RequestSink(asyncio.get_running_loop()) for _ in range(6)]
        lengths = [30, 5, 5, 5, 5, 5]
        for i, (sink, n) in enumerate(zip(sinks, lengths, strict=True)):
            sched.submit([Sequence(f"r{i}", 0, [1, 2, 3], Params(n), sink)])
        sched.abort(["r5"])  # cancelled while waiting

        async def drain(sink):
            text = ""
            while True:
                for ev in await sink.queue.get():
                    text += ev.text
                    if ev.finished:
                        return text, ev.finish_reason

        results = await asyncio.gather(*(drain(s) for s in sinks))
        sched.stop()
        assert engine.max_batch == 3  # never more than the slots
        # r1..r4 (5 tokens) finished while r0 (30 tokens) kept running: admitted mid-batch, FIFO
        assert engine.admission_log == ["r0", "r1", "r2", "r3", "r4"]
        assert results[:5] == [("x" * 30, "length")] + [("x" * 5, "length")] * 4
        assert results[5] == ("", "abort")
        assert sched.num_running == 0 and sched.num_waiting == 0

    asyncio.run(run())


def test_scheduler_queue_full_and_drain():
    from awqkit.server.scheduler import QueueFullError, RequestSink, Scheduler, Sequence, ShuttingDownError

    @dataclass
    class Params:
        max_new_tokens: int

    async def run() -> None:
        engine = _FakeEngine(slots=1)
        sched = Scheduler(engine, max_queue=1)
        sched.start()
        sink = RequestSink(asyncio.get_running_loop())
        sched.submit([Sequence("a", 0, [1], Params(10_000), sink), Sequence("b", 1, [1], Params(10_000), sink)])
        await asyncio.to_thread(_wait_for, lambda: sched.num_running == 1, 5, "admission")
        with pytest.raises(QueueFullError):
            sched.submit([Sequence("c", 0, [1], Params(1), RequestSink(asyncio.get_running_loop()))])
        sched.drain(0.05)
        with pytest.raises(ShuttingDownError):
            sched.submit([Sequence("d", 0, [1], Params(1), sink)])
        reasons = {}
        while len(reasons) < 2:
            for ev in await sink.queue.get():
                if ev.finished:
                    reasons[ev.index] = ev.finish_reason
        assert reasons == {0: "abort", 1: "abort"}
        sched.stop()
        assert not sched.alive

    asyncio.run(run())


def test_trailing_comma_tolerance_is_narrow():
    from awqkit.server.protocol import ApiError, parse_json_body, strip_trailing_commas

    assert strip_trailing_commas('{"a": [1, 2,], "b": "x,]",}') == '{"a": [1, 2], "b": "x,]"}'
    assert parse_json_body(b'{"a": {"b": 1,},}') == {"a": {"b": 1}}
    for bad in (b'{"a": 1,, }', b'{"a": }', b"{,}", b'{"a": "\\,"'):
        with pytest.raises(ApiError):
            parse_json_body(bad)


def test_command_line_errors_are_one_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "awqkit.server", "--port", "1"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("awqkit serve: error: no checkpoint given")


def test_guide_code_is_dedented_python():
    compile(textwrap.dedent(GUIDE_PYTHON), "guide", "exec")
