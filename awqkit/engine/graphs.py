"""The decode step, run eagerly (CPU) or replayed from CUDA graphs (GPU).

A decode step of a 7B model is ~450 kernels (3.4 ms on an H100 at batch 1); launched one by one from Python they
would cost more than they run. A CUDA graph records the launches once and replays them with one call. A graph fixes
its shapes, so we capture one per bucket: batch rows (1, 2, 4, ... max_num_seqs) times attended context (256, 512,
... max_model_len); a step uses the smallest bucket that fits, so it never reads more than twice the cache it needs.

Prefill forwards are graphed too, lazily and padded to buckets (:class:`PrefillRunner`).
"""

from __future__ import annotations

from collections import OrderedDict

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

    def __init__(self, model: Transformer, max_num_seqs: int) -> None:
        self.model = model
        # each row's most recently sampled token, kept on the device (see ``remember``)
        self.last_tokens = torch.zeros(max_num_seqs, dtype=torch.long, device=model.embed.device)

    def __call__(self, tokens: list[int], positions: list[int], from_last: list[int], kv_len: int) -> torch.Tensor:
        """Logits ``[>= len(tokens), vocab]`` for rows ``0 .. len(tokens)`` (one new token each).

        A row with ``from_last[i]`` set feeds ``last_tokens[i]`` (a token sampled on the device and not yet read
        back) instead of ``tokens[i]``."""
        device = self.model.embed.device
        n = len(tokens)
        t = torch.tensor(tokens, dtype=torch.long, device=device)
        flags = torch.tensor(from_last, dtype=torch.bool, device=device)
        t = torch.where(flags, self.last_tokens[:n], t)[:, None]
        p = torch.tensor(positions, dtype=torch.long, device=device)[:, None]
        return self.model(t, p, 0, kv_len)

    def remember(self, tokens: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Keep ``tokens`` sampled for ``rows`` (None: rows ``0 .. len(tokens)``) as the rows' next inputs."""
        if rows is None:
            self.last_tokens[: len(tokens)].copy_(tokens)
        else:
            self.last_tokens.index_copy_(0, rows, tokens)


class GraphDecoder(EagerDecoder):
    """One CUDA graph per (batch bucket, context bucket), captured at start-up; replay is the whole step."""

    def __init__(self, model: Transformer, max_num_seqs: int, max_model_len: int) -> None:
        super().__init__(model, max_num_seqs)
        self.batch_sizes = buckets(max_num_seqs, 1)
        self.kv_lens = buckets(max_model_len, 256)
        device = model.embed.device
        # static inputs the graphs read: tokens, positions, from-last flags; idle rows get token 0 at the scratch
        # position max_model_len. Two pinned host buffers, used in turn: with the engine's overlapped decode the
        # copy from one may still be queued behind the step in flight while the next step's inputs are written.
        self.scratch = max_model_len
        self.host = [torch.zeros(3, max_num_seqs, dtype=torch.long).pin_memory() for _ in range(2)]
        self.host_np = [h.numpy() for h in self.host]  # filled from Python lists without building tensors
        self.turn = 0
        self.inputs = torch.zeros(3, max_num_seqs, dtype=torch.long, device=device)
        self.inputs[1].fill_(self.scratch)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        # kept: PrefillRunner captures its graphs into this pool too (see its docstring)
        self.pool = pool = torch.cuda.graph_pool_handle()
        # largest first: later (smaller) graphs reuse its memory in the shared pool
        for b in reversed(self.batch_sizes):
            for kv_len in reversed(self.kv_lens):
                self._capture(b, kv_len, pool)

    def _step(self, b: int, kv_len: int) -> torch.Tensor:
        tokens = torch.where(self.inputs[2, :b] > 0, self.last_tokens[:b], self.inputs[0, :b])
        return self.model(tokens[:, None], self.inputs[1, :b, None], 0, kv_len)

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

    def __call__(self, tokens: list[int], positions: list[int], from_last: list[int], kv_len: int) -> torch.Tensor:
        b = smallest_at_least(self.batch_sizes, len(tokens))
        kv_len = smallest_at_least(self.kv_lens, kv_len)
        n = len(tokens)
        host, host_np = self.host[self.turn], self.host_np[self.turn]
        self.turn ^= 1
        host_np[0, :n], host_np[1, :n], host_np[2, :n] = tokens, positions, from_last
        host_np[0, n:b], host_np[1, n:b], host_np[2, n:b] = 0, self.scratch, 0
        self.inputs[:, :b].copy_(host[:, :b], non_blocking=True)
        self.graphs[b, kv_len].replay()
        return self.outputs[b, kv_len]
