"""The decode step, run eagerly (CPU) or replayed from CUDA graphs (GPU).

A decode step of a 7B model is ~450 kernels (3.4 ms on an H100 at batch 1); launched one by one from Python they
would cost more than they run. A CUDA graph records the launches once and replays them with one call. A graph fixes
its shapes, so we capture one per bucket: batch rows (1, 2, 4, ... max_num_seqs) times attended context (256, 512,
... max_model_len); a step uses the smallest bucket that fits, so it never reads more than twice the cache it needs.
"""

from __future__ import annotations

import torch

from awqkit.engine.model import Transformer


def buckets(limit: int, first: int) -> list[int]:
    """``first, 2 * first, 4 * first, ...`` below ``limit``, then ``limit``."""
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def smallest_at_least(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


class EagerDecoder:
    """Runs the decode step directly (CPU, or CUDA with graphs off)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def __call__(self, tokens: list[int], positions: list[int], kv_len: int) -> torch.Tensor:
        """Logits ``[>= len(tokens), vocab]`` for rows ``0 .. len(tokens)`` (one new token each)."""
        device = self.model.embed.device
        t = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        p = torch.tensor(positions, dtype=torch.long, device=device)[:, None]
        return self.model(t, p, 0, kv_len)


class GraphDecoder:
    """One CUDA graph per (batch bucket, context bucket), captured at start-up; replay is the whole step."""

    def __init__(self, model: Transformer, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.batch_sizes = buckets(max_num_seqs, 1)
        self.kv_lens = buckets(max_model_len, 256)
        device = model.embed.device
        # static inputs the graphs read; idle rows get token 0 at the scratch position max_model_len
        self.scratch = max_model_len
        self.host = torch.zeros(2, max_num_seqs, dtype=torch.long).pin_memory()
        self.host_np = self.host.numpy()  # filled from Python lists without building tensors
        self.inputs = torch.zeros(2, max_num_seqs, dtype=torch.long, device=device)
        self.inputs[1].fill_(self.scratch)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        # largest first: later (smaller) graphs reuse its memory in the shared pool
        for b in reversed(self.batch_sizes):
            for kv_len in reversed(self.kv_lens):
                self._capture(b, kv_len, pool)

    def _step(self, b: int, kv_len: int) -> torch.Tensor:
        return self.model(self.inputs[0, :b, None], self.inputs[1, :b, None], 0, kv_len)

    def _capture(self, b: int, kv_len: int, pool) -> None:
        # warm up on a side stream first: torch.compile and the kernels' autotuning must not run during capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(b, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs[b, kv_len] = self._step(b, kv_len)
        self.graphs[b, kv_len] = graph

    def __call__(self, tokens: list[int], positions: list[int], kv_len: int) -> torch.Tensor:
        b = smallest_at_least(self.batch_sizes, len(tokens))
        kv_len = smallest_at_least(self.kv_lens, kv_len)
        n = len(tokens)
        self.host_np[0, :n] = tokens
        self.host_np[1, :n] = positions
        self.host_np[0, n:b] = 0
        self.host_np[1, n:b] = self.scratch
        # the previous step's copy has finished: the engine reads each step's tokens back before the next
        self.inputs[:, :b].copy_(self.host[:, :b], non_blocking=True)
        self.graphs[b, kv_len].replay()
        return self.outputs[b, kv_len]
