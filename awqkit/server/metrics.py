"""Prometheus metrics for ``GET /metrics``.

Each app owns its own registry, so several apps in one process (tests) never collide. Names follow vLLM's where one
exists, with the ``awqkit_`` prefix. Counters and histograms are updated from the scheduler thread and the event loop;
``prometheus_client`` is thread-safe.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds. TTFT spans queueing + prefill; ITL is one decode step of the whole batch.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)

# Routes counted by name; anything else is counted as "other" so scanners cannot grow the label set.
KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's counters, gauges and histograms, in a registry of their own."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name}
        r = self.registry
        self.requests = Counter(
            "awqkit_http_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "awqkit_prompt_tokens", "Prompt tokens admitted to the engine.", ["model_name"], registry=r
        ).labels(**labels)
        self.generation_tokens = Counter(
            "awqkit_generation_tokens", "Tokens generated.", ["model_name"], registry=r
        ).labels(**labels)
        self.finished = Counter(
            "awqkit_request_success",
            "Sequences finished, by finish reason (stop, length, abort, error).",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "awqkit_time_to_first_token_seconds",
            "Time from a sequence's arrival to its first generated token.",
            ["model_name"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.itl = Histogram(
            "awqkit_inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one sequence.",
            ["model_name"],
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.e2e = Histogram(
            "awqkit_e2e_request_latency_seconds",
            "Time from a sequence's arrival to its end.",
            ["model_name"],
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.running = Gauge(
            "awqkit_num_requests_running", "Sequences in the engine's decode batch.", ["model_name"], registry=r
        ).labels(**labels)
        self.waiting = Gauge(
            "awqkit_num_requests_waiting", "Sequences waiting for a slot.", ["model_name"], registry=r
        ).labels(**labels)
        self._model_name = model_name

    def count_finish(self, reason: str) -> None:
        """Count one finished sequence."""
        self.finished.labels(model_name=self._model_name, finished_reason=reason).inc()

    def count_request(self, path: str, status: int) -> None:
        """Count one HTTP response."""
        route = path if path in KNOWN_ROUTES else "other"
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
