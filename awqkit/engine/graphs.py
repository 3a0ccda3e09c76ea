"""The decode step, run eagerly (CPU) or replayed from CUDA graphs (GPU).

A decode step of a 7B model is ~450 kernels (3.4 ms on an H100 at batch 1); launched one by one from Python they
would cost more than they run. A CUDA graph records the launches once and replays them with one call. A graph fixes
its shapes, so we capture one per bucket: batch rows (1, 2, 4, ... max_num_seqs) times attended context (256, 512,
... max_model_len); a step uses the smallest bucket that fits, so it never reads more than twice the cache it needs.

Prefill forwards are graphed too, lazily and padded to buckets (:class:`PrefillRunner`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from awqkit.engine.model import Transformer
from awqkit.engine.transfer import to_device

log = logging.getLogger(__name__)


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
        t = to_device(tokens, torch.long, device)
        flags = to_device(from_last, torch.bool, device)
        t = torch.where(flags, self.last_tokens[:n], t)[:, None]
        p = to_device(positions, torch.long, device)[:, None]
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


# --- prefill ------------------------------------------------------------------------------------------------------


def prefill_size(rows: int, length: int) -> int:
    """Elements of the flat ``long`` input block of a ``rows x length`` prefill (layout: :func:`prefill_views`)."""
    return 2 * rows * length + 2 * rows


def prefill_views(buf: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, ...]:
    """``(tokens [rows, length], positions [rows, length], slots [rows], last [rows])`` as views of the flat ``buf``,
    back to back, so that one copy moves a whole block."""
    n = rows * length
    tokens, positions = buf[:n].view(rows, length), buf[n : 2 * n].view(rows, length)
    return tokens, positions, buf[2 * n : 2 * n + rows], buf[2 * n + rows : 2 * n + 2 * rows]


def pad_prefill(
    buf: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: int | torch.Tensor,
    last: torch.Tensor | None,
    rows: int,
    length: int,
    scratch: int,
) -> None:
    """Write a ``[B, T]`` prefill block padded to ``rows x length`` into ``buf`` (layout: :func:`prefill_views`).

    Padding — the extra columns of real rows and the extra rows — is token 0 at position ``scratch``
    (``max_model_len``), the cache's spare column: its keys and values go there and no query reads them, since every
    ``kv_len <= max_model_len``. Extra rows take slot 0, a real slot, so that every cache index stays in range: they
    read its cache (harmlessly) and write only its scratch column. Their ``last`` is column 0; real rows' defaults to
    ``T - 1`` as in ``Transformer.forward``.
    """
    B, T = tokens.shape
    tok, pos, slot, col = prefill_views(buf, rows, length)
    buf[: prefill_size(rows, length)].zero_()
    pos.fill_(scratch)
    tok[:B, :T] = tokens
    pos[:B, :T] = positions
    if isinstance(slots, int):
        torch.arange(slots, slots + B, out=slot[:B])
    else:
        slot[:B] = slots
    col[:B] = T - 1 if last is None else last


class PrefillRunner:
    """Prefill forwards with ``Transformer.forward``'s signature, replayed from CUDA graphs captured lazily per bucket.

    A 128-token prefill of a 7B model launches ~450 kernels one by one from Python (~36 ms of host time for ~12 ms of
    GPU work); a replay launches them at once. On CUDA a block ``[B, T]`` attending over ``kv_len`` positions is
    padded (:func:`pad_prefill`) to a bucket: rows to a power of two up to ``max_num_seqs``, tokens to a power of
    two >= 16 up to ``prefill_chunk``, context to the decode graphs' buckets (256, 512, ... ``max_model_len``), and at
    most ``2 * prefill_chunk`` padded tokens (every block the engine makes, when the chunk is a power of two: the
    padding less than doubles each of B and T, and ``B * T <= prefill_chunk``). Anything else (larger blocks,
    ``logits="all"``) runs eagerly. Every graph computes the "last" logits (padded rows read column 0), so one graph
    per bucket serves "last" and "none" calls alike; "none" costs one extra ``[B, hidden] x lm_head`` product.

    Graphs are captured on a bucket's first use (a warm-up forward on a side stream first, so that torch.compile and
    Triton compile outside the capture; it writes the same keys and values the replay then writes again) and kept
    up to ``max_graphs``, least recently used evicted. On a CPU, or with ``cuda_graphs`` off, calls run the model
    directly, unpadded.

    Memory. A captured graph keeps its peak allocations reserved in its memory pool, and prefill peaks are large:
    the dequantize + cuBLAS path of ``awqkit.kernels.dispatch`` (M > 64..128 tokens) makes a full bf16 copy of a
    layer's weight per matmul (272 MB for a 7B gate_up). So all prefill graphs share ONE pool, by default the decode
    graphs' (``pool=GraphDecoder.pool``): its size is then the largest single graph's peak, not their sum, and
    evicting a graph frees nothing but costs nothing either. Sharing is safe because (1) graphs replay one at a time
    on one stream, so one graph's temporaries are dead before another's start, and (2) no prefill graph leaves a
    live output in the pool: each copies its logits into ``self.logits``, allocated outside the pool and shared by
    all of them (so a prefill replay cannot overwrite a decode graph's output or vice versa; the decode graphs'
    outputs, alive when these are captured, are never handed to them). The price: the returned logits are a view of
    that buffer, overwritten by the next call — queue whatever reads them before calling again (the engine samples
    at once). The warm-up forwards also leave one eager prefill's peak cached by the allocator on the side stream.

    Inputs on the host (CPU tensors, the cheap way to call it) go to the device in one pinned copy per call; two
    pinned buffers are used in turn, each reused only once its previous copy has been made (an event), since the
    host may run ahead of the device. Device tensors are padded on the device.
    """

    def __init__(
        self,
        model: Transformer,
        max_num_seqs: int,
        max_model_len: int,
        prefill_chunk: int,
        cuda_graphs: bool = True,
        pool: tuple | None = None,
        max_graphs: int = 32,
    ) -> None:
        """
        Args:
            pool: a CUDA graph memory pool (``torch.cuda.graph_pool_handle()``) to capture into: pass the decode
                graphs' (``GraphDecoder.pool``); None → one of its own, still shared by every prefill graph.
            max_graphs: graphs kept at once; the least recently used is dropped to capture a new bucket.
        """
        self.model, self.scratch, self.max_graphs = model, max_model_len, max_graphs
        self.device = model.embed.device
        self.rows = buckets(max_num_seqs, 1)
        self.lengths = buckets(prefill_chunk, 16)
        self.kv_lens = buckets(max_model_len, 256)
        self.max_tokens = 2 * prefill_chunk
        self.max_rows = max(r for r in self.rows if r * self.lengths[0] <= self.max_tokens)
        self.graphed = cuda_graphs and self.device.type == "cuda"
        self.graphs: OrderedDict[tuple[int, int, int], torch.cuda.CUDAGraph] = OrderedDict()
        self.stats = {"replays": 0, "captures": 0, "evictions": 0, "eager": 0}
        self.logits: torch.Tensor | None = None  # [max_rows, vocab], every graph's output (class docstring)
        if self.graphed:
            size = 2 * self.max_tokens + 2 * self.max_rows  # >= prefill_size of any bucket
            self.inputs = torch.zeros(size, dtype=torch.long, device=self.device)
            self.host = [torch.zeros(size, dtype=torch.long).pin_memory() for _ in range(2)]
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.turn = 0
            self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream()  # one side stream for every warm-up: its cached memory is reused

    def bucket(self, rows: int, length: int, kv_len: int) -> tuple[int, int, int] | None:
        """The ``(rows, length, kv_len)`` a block is padded to, or None where it is beyond the buckets."""
        if rows > self.max_rows or length > self.lengths[-1] or kv_len > self.kv_lens[-1]:
            return None
        b, t = smallest_at_least(self.rows, rows), smallest_at_least(self.lengths, length)
        if b * t > self.max_tokens:
            return None
        return b, t, smallest_at_least(self.kv_lens, kv_len)

    @torch.inference_mode()
    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: int | torch.Tensor,
        kv_len: int,
        logits: str = "last",
        last: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """As ``Transformer.forward`` (inputs on the host or the device); graphed for ``logits`` "last" and "none".

        Returns:
            "last": ``[B, vocab]`` — from a graph, a view that the next call overwrites; "none": None.
        """
        B, T = tokens.shape
        key = self.bucket(B, T, kv_len) if self.graphed and logits in ("last", "none") else None
        if key is None:
            self.stats["eager"] += 1
            return self._eager(tokens, positions, slots, kv_len, logits, last)
        self._fill(key, tokens, positions, slots, last)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key)
            if graph is None:  # capture failed: graphs are off from now on (_capture logged why)
                return self._eager(tokens, positions, slots, kv_len, logits, last)
        self.graphs.move_to_end(key)
        graph.replay()
        self.stats["replays"] += 1
        return None if logits == "none" else self.logits[:B]

    def capture(self, rows: int, length: int, kv_len: int) -> None:
        """Capture the bucket of a ``rows x length`` block now (e.g. at start-up), with pure padding as its inputs:
        every row writes only its scratch column, so this is safe while requests hold slots."""
        key = self.bucket(rows, length, kv_len)
        if not self.graphed or key is None or key in self.graphs:
            return
        empty = torch.zeros(0, 0, dtype=torch.long)
        self._fill(key, empty, empty, 0, None)
        self._capture(key)

    def run_padded(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: int | torch.Tensor,
        kv_len: int,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The padded forward a graph replays, run eagerly on fresh inputs: ``[B, vocab]`` "last" logits (tests and
        start-up checks; works on a CPU)."""
        key = self.bucket(*tokens.shape, kv_len)
        if key is None:
            raise ValueError(f"a {tuple(tokens.shape)} block over {kv_len} positions is beyond the prefill buckets")
        b, t, _ = key
        buf = torch.empty(prefill_size(b, t), dtype=torch.long, device=self.device)
        pad_prefill(buf, *self._on_device(tokens, positions, slots, last), b, t, self.scratch)
        return self._forward(buf, key)[: tokens.shape[0]]

    # --- internals ----------------------------------------------------------------------------------------------

    def _on_device(self, tokens, positions, slots, last) -> tuple:
        d = self.device
        slots = slots if isinstance(slots, int) else slots.to(d)
        return tokens.to(d), positions.to(d), slots, None if last is None else last.to(d)

    def _eager(self, tokens, positions, slots, kv_len, logits, last) -> torch.Tensor | None:
        tokens, positions, slots, last = self._on_device(tokens, positions, slots, last)
        return self.model(tokens, positions, slots, kv_len, logits=logits, last=last)

    def _forward(self, buf: torch.Tensor, key: tuple[int, int, int]) -> torch.Tensor:
        """What a graph records: the padded block read from ``buf``, "last" logits ``[rows, vocab]``."""
        b, t, kv_len = key
        tokens, positions, slots, last = prefill_views(buf, b, t)
        return self.model(tokens, positions, slots, kv_len, logits="last", last=last)

    def _fill(self, key: tuple[int, int, int], tokens, positions, slots, last) -> None:
        """Pad the block into the static inputs ``self.inputs``."""
        b, t, _ = key
        on_host = all(x.device.type == "cpu" for x in (tokens, positions, slots, last) if isinstance(x, torch.Tensor))
        if not on_host:  # already on the device: pad there (a few small kernels, no round trip through the host)
            pad_prefill(self.inputs, *self._on_device(tokens, positions, slots, last), b, t, self.scratch)
            return
        i, self.turn = self.turn, self.turn ^ 1
        self.copied[i].synchronize()  # this buffer's last copy (two calls ago) has been made: it may be rewritten
        pad_prefill(self.host[i], tokens, positions, slots, last, b, t, self.scratch)
        n = prefill_size(b, t)
        self.inputs[:n].copy_(self.host[i][:n], non_blocking=True)
        self.copied[i].record()

    def _capture(self, key: tuple[int, int, int]) -> torch.cuda.CUDAGraph | None:
        """Warm up and capture ``key``'s graph (its inputs already filled); None, and graphs off, if that fails."""
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)  # its temporaries were already free in the shared pool
            self.stats["evictions"] += 1
        try:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self._forward(self.inputs, key)
            torch.cuda.current_stream().wait_stream(self.stream)
            if self.logits is None:
                self.logits = torch.empty((self.max_rows, out.shape[1]), dtype=out.dtype, device=self.device)
            del out
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                # copied out of the pool, so that no graph leaves a live tensor in it (class docstring)
                self.logits[: key[0]].copy_(self._forward(self.inputs, key))
        except Exception as e:  # an op that cannot be captured must not stop generation: run eagerly from now on
            log.warning("capturing the prefill graph %s failed (%s); prefill runs eagerly from now on", key, e)
            self.graphed = False
            self.graphs.clear()
            return None
        self.graphs[key] = graph
        self.stats["captures"] += 1
        return graph
