"""AWQ over a whole model, one decoder layer at a time.

For each layer:

1. run it (in the compute dtype) over every calibration block, gathering each scale group's input statistics;
2. per group, search the scales (:mod:`awqkit.awq.search`) and fold them into the float weights
   (:mod:`awqkit.awq.fold`), checking after each fold that the layer's float output did not move;
3. search and apply the clipping of every Linear except q/k, scored on every calibration token through per-group
   Gram matrices (:func:`awqkit.awq.search.block_gram`);
4. hand the next layer its inputs: the float layer's outputs from step 1 (AutoAWQ's choice and the default), or,
   with ``propagate_quantized``, the outputs of the quantized layer (one more forward pass; it measured worse on
   SmolLM2 once the clip search saw every token — benchmarks/README.md).

Only the layer being processed sits on the compute device, so peak device memory is one layer plus its
activations. The caller turns finished layers into packed modules through ``on_layer_done``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awqkit.arch import ArchSpec, ScaleGroup
from awqkit.awq.capture import GroupInputs, kwargs_for, slice_batch
from awqkit.awq.fold import channel_map, check_fold, fold_scales
from awqkit.awq.quantizer import fake_quantize
from awqkit.awq.search import apply_clip, block_gram, gram_loss, quantized_trial, search_clip, search_scales
from awqkit.errors import NumericalError


@dataclass
class AwqOptions:
    """Knobs of the search (defaults follow AutoAWQ unless noted).

    Attributes:
        group_size, zero_point: the quantization being optimised for.
        duo_scaling: scales from activations *and* weights (``x̄^α / w̄^(1-α)``), else activations only.
        apply_clip: run the clip search.
        n_grid: α grid points in [0, 1).
        search_tokens: tokens (whole sequences) on which block-output losses are measured; the activation
            statistics and the clip search always use every token.
        gram_tokens: evenly strided tokens whose second moments ``XᵀX`` give single-Linear losses.
        batch: sequences per forward pass (memory bound).
        device, dtype: where and in what precision layers run; folds and quantization are always fp32.
        propagate_quantized: feed the next layer the quantized layer's outputs (False: the float outputs, as AutoAWQ).
        fold_tolerance: largest relative change of a layer's float output a fold may cause.
    """

    group_size: int
    zero_point: bool = True
    duo_scaling: bool = True
    apply_clip: bool = True
    n_grid: int = 20
    search_tokens: int = 2048
    gram_tokens: int = 4096
    batch: int = 16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    propagate_quantized: bool = False
    fold_tolerance: float = 1e-4


@dataclass
class LayerReport:
    """What the search did to one layer; all MSEs are of block outputs against the float model."""

    index: int
    groups: list[dict[str, Any]]
    clip: dict[str, float]
    layer_mse: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _cast_kwargs(kwargs: dict[str, Any], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        if isinstance(v, tuple):
            return tuple(cast(t) for t in v)
        return v

    return {k: cast(v) for k, v in kwargs.items()}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, what: str) -> None:
    # a sum is NaN/Inf iff some element is (finite values this large cannot overflow fp32), and far cheaper
    if not torch.isfinite(t.sum(dtype=torch.float32)):
        raise NumericalError(
            f"{what} contains NaN or Inf; check the source model's weights (or the calibration text for activations), "
            "or load it in float32"
        )


class _StatsComplete(Exception):
    """Raised inside a gather forward once every watched Linear has recorded its input."""


class LayerQuantizer:
    """Runs AWQ on one decoder layer. ``layer`` is the fp32 master copy; it is modified in place."""

    def __init__(self, index: int, layer: nn.Module, spec: ArchSpec, opts: AwqOptions, kwargs: dict[str, Any]):
        self.index, self.layer, self.spec, self.opts = index, layer, spec, opts
        self.kwargs32 = _cast_kwargs(kwargs, torch.float32, opts.device)
        self.kwargs = _cast_kwargs(kwargs, opts.dtype, opts.device)
        self.groups = {g.linears[0]: g for g in spec.groups}
        self.stats: dict[str, GroupInputs] = {}

    # -- helpers -------------------------------------------------------------------------------------------------
    def _linear(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def _channel_map(self, group: ScaleGroup) -> torch.Tensor | None:
        """Which output of ``group.prev`` feeds each input channel of the group (None: cannot fold)."""
        parent = self.layer.get_submodule(group.prev.rpartition(".")[0]) if "." in group.prev else self.layer
        head_dim = getattr(parent, "head_dim", None)
        return channel_map(self._linear(group.prev), [self._linear(n) for n in group.linears], head_dim)

    def _forward(self, module: nn.Module, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Run ``module`` (a layer or a block inside it) over ``inputs`` in batches; the result is in ``dtype``."""
        kw = self.kwargs if dtype != torch.float32 else self.kwargs32
        kw = kwargs_for(module, kw)
        outs = []
        total = inputs.shape[0]
        for start in range(0, total, self.opts.batch):
            sel = slice(start, start + self.opts.batch)
            x = inputs[sel].to(self.opts.device, dtype)
            outs.append(_first(module(x, **slice_batch(kw, sel, total))))
        return torch.cat(outs).to(inputs.device)

    def _search_rows(self, n_seq: int, seq_len: int) -> list[int]:
        count = min(n_seq, max(1, math.ceil(self.opts.search_tokens / seq_len)))
        return sorted({round(i * (n_seq - 1) / max(count - 1, 1)) for i in range(count)})

    # -- 1. statistics -------------------------------------------------------------------------------------------
    def gather(self, work: nn.Module, inputs: torch.Tensor, need_output: bool) -> torch.Tensor | None:
        """Run ``work`` over all inputs, recording each group's input statistics; returns the outputs if needed.

        Without ``need_output`` each batch stops as soon as every watched Linear has seen its input (it skips the
        last Linear and what follows: a quarter of a Llama layer's work).
        """
        n_seq, seq_len = inputs.shape[:2]
        search_rows = self._search_rows(n_seq, seq_len)
        gram_stride = max(1, (n_seq * seq_len) // self.opts.gram_tokens)
        state: dict[str, Any] = {"start": 0, "fired": set()}
        handles = []
        # one hook per distinct input: the first Linear of every group, plus any Linear not first in a group
        watched = {g.linears[0]: g for g in self.spec.groups}

        def hook_for(name: str, group: ScaleGroup):
            st = self.stats.setdefault(name, GroupInputs())
            wants_gram = group.inspect is None and self._channel_map(group) is not None

            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach()
                b = x.shape[0]
                flat = x.reshape(-1, x.shape[-1]).to(torch.float32, copy=True)  # a copy: abs_ below is in place
                st.tokens += flat.shape[0]
                if wants_gram:  # every gram_stride-th token of the whole calibration set
                    sample = flat[(-state["start"] * seq_len) % gram_stride :: gram_stride].contiguous()
                    g = sample.T @ sample
                    st.gram = g if st.gram is None else st.gram + g
                    st.gram_tokens += sample.shape[0]
                bg = block_gram(flat, self.opts.group_size)
                st.block_gram = bg if st.block_gram is None else st.block_gram + bg
                abs_sum = flat.abs_().sum(0)
                st.abs_sum = abs_sum if st.abs_sum is None else st.abs_sum + abs_sum
                rows = [r - state["start"] for r in search_rows if state["start"] <= r < state["start"] + b]
                if rows:
                    st.search.append(x[rows].cpu())
                state["fired"].add(name)
                if not need_output and len(state["fired"]) == len(watched):
                    raise _StatsComplete

            return hook

        for name, group in watched.items():
            handles.append(work.get_submodule(name).register_forward_pre_hook(hook_for(name, group)))
        outs = []
        try:
            kw = kwargs_for(work, self.kwargs)
            with torch.no_grad():
                for start in range(0, n_seq, self.opts.batch):
                    state["start"], state["fired"] = start, set()
                    sel = slice(start, start + self.opts.batch)
                    x = inputs[sel].to(self.opts.device, self.opts.dtype)
                    try:
                        outs.append(_first(work(x, **slice_batch(kw, sel, n_seq))).cpu())
                    except _StatsComplete:
                        pass
        finally:
            for h in handles:
                h.remove()
        if not need_output:
            return None
        out = torch.cat(outs)
        _check_finite(out, f"the output of decoder layer {self.index}")
        return out

    # -- 2. scales -----------------------------------------------------------------------------------------------
    def _sync_work(self, work: nn.Module, names: list[str]) -> None:
        for name in names:
            src, dst = self.layer.get_submodule(name), work.get_submodule(name)
            for attr in ("weight", "bias"):
                if getattr(src, attr, None) is not None:
                    getattr(dst, attr).data.copy_(getattr(src, attr).data.to(getattr(dst, attr).dtype))

    def search_group(self, work: nn.Module, group: ScaleGroup, check_x: torch.Tensor, ref: torch.Tensor) -> dict:
        prev = self._linear(group.prev)
        linears = [self._linear(n) for n in group.linears]
        entry: dict[str, Any] = {"prev": group.prev, "linears": list(group.linears)}
        mapping = self._channel_map(group)
        if mapping is None:
            entry["skipped"] = f"{group.prev}'s outputs cannot absorb scales of {group.linears[0]}'s inputs"
            return entry
        st = self.stats[group.linears[0]]
        g, zp = self.opts.group_size, self.opts.zero_point
        masters = [fc.weight.data for fc in linears]

        if group.inspect is None:
            # bf16 products where the layers run in bf16 (fp16 could overflow a sum of squares)
            loss_dtype = torch.bfloat16 if self.opts.dtype == torch.bfloat16 else torch.float32
            gram, w = st.gram.to(self.opts.device, loss_dtype), masters[0]

            def loss_of(s: torch.Tensor) -> float:
                return gram_loss(quantized_trial(w, s, g, zp) - w, gram, st.gram_tokens)
        else:
            block = work.get_submodule(group.inspect)
            work_fcs = [work.get_submodule(n) for n in group.linears]
            x = torch.cat(st.search).to(self.opts.device)
            with torch.no_grad():
                fp_out = self._forward(block, x, self.opts.dtype)

            def loss_of(s: torch.Tensor) -> float:
                for fc, w in zip(work_fcs, masters):
                    fc.weight.data.copy_(quantized_trial(w, s, g, zp).to(fc.weight.dtype))
                with torch.no_grad():
                    out = self._forward(block, x, self.opts.dtype)
                return (out.float() - fp_out.float()).pow(2).mean().item()

        result = search_scales(
            st.mean_abs.to(self.opts.device), masters, g, loss_of, self.opts.duo_scaling, self.opts.n_grid, mapping
        )
        fold_scales(prev, linears, result.scales, self.spec.norm_offset, mapping)
        with torch.no_grad():
            after = _first(self.layer(check_x, **kwargs_for(self.layer, self.kwargs32)))
        entry["fold_error"] = check_fold(
            ref,
            after,
            f"decoder layer {self.index} ({group.prev} → {', '.join(group.linears)})",
            self.opts.fold_tolerance,
        )
        # the group's inputs are now x / s
        inv = (1 / result.scales.float()).view(-1, self.opts.group_size)
        st.block_gram = st.block_gram * inv.unsqueeze(2) * inv.unsqueeze(1)
        self._sync_work(work, [group.prev, *group.linears])
        entry.update(alpha=result.alpha, rtn_mse=result.rtn_mse, awq_mse=result.awq_mse)
        return entry

    # -- 3. clipping ---------------------------------------------------------------------------------------------
    def clip_all(self) -> dict[str, float]:
        shrinks = {}
        for group in self.spec.groups:
            st = self.stats[group.linears[0]]
            for name in group.linears:
                if any(name.endswith(skip) for skip in self.spec.no_clip):
                    continue
                w = self._linear(name).weight.data
                low, high, shrinks[name] = search_clip(
                    w, st.block_gram, self.opts.group_size, self.opts.zero_point, self.opts.n_grid
                )
                apply_clip(w, low, high, self.opts.group_size)
        return shrinks

    # -- the whole layer -----------------------------------------------------------------------------------------
    def fake_quantized(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A copy of ``module`` (in ``dtype``) whose Linears hold the weights the quantized model computes with."""
        q = copy.deepcopy(module).to(dtype)
        for name in self.spec.linears:
            fc = q.get_submodule(name)
            fc.weight.data = fake_quantize(
                self.layer.get_submodule(name).weight.data.float(), self.opts.group_size, self.opts.zero_point
            ).to(dtype)
        return q

    def run(self, inputs: torch.Tensor) -> tuple[torch.Tensor, LayerReport]:
        t0 = time.perf_counter()
        self.layer.to(self.opts.device, torch.float32)
        for name, p in self.layer.named_parameters():
            _check_finite(p, f"weight {name} of decoder layer {self.index}")
        _check_finite(inputs, f"the input of decoder layer {self.index}")
        work = copy.deepcopy(self.layer).to(self.opts.dtype)
        float_out = self.gather(work, inputs, need_output=not self.opts.propagate_quantized)

        check_x = inputs[:1].to(self.opts.device, torch.float32)  # one whole sequence: kwargs are per-position
        kw32 = kwargs_for(self.layer, slice_batch(self.kwargs32, slice(0, 1), inputs.shape[0]))
        with torch.no_grad():
            ref = _first(self.layer(check_x, **kw32))
            rtn = _first(self.fake_quantized(self.layer, torch.float32)(check_x, **kw32))

        groups = [self.search_group(work, g, check_x, ref) for g in self.spec.groups]
        clip = self.clip_all() if self.opts.apply_clip else {}
        with torch.no_grad():
            awq = _first(self.fake_quantized(self.layer, torch.float32)(check_x, **kw32))
        mse = {"rtn": (rtn - ref).pow(2).mean().item(), "awq": (awq - ref).pow(2).mean().item()}

        if self.opts.propagate_quantized:
            with torch.no_grad():
                next_inputs = self._forward(self.fake_quantized(work, self.opts.dtype), inputs, self.opts.dtype)
            _check_finite(next_inputs, f"the quantized output of decoder layer {self.index}")
        else:
            next_inputs = float_out
        self.layer.to("cpu")
        self.stats.clear()
        report = LayerReport(self.index, groups, clip, mse, time.perf_counter() - t0)
        return next_inputs, report


def run_awq(
    layers: nn.ModuleList,
    spec: ArchSpec,
    inputs: torch.Tensor,
    layer_kwargs: dict[str, Any],
    opts: AwqOptions,
    start_layer: int = 0,
    on_layer_done: Callable[[int, nn.Module, torch.Tensor, LayerReport], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[LayerReport]:
    """Quantize-aware search over ``layers[start_layer:]``; returns one report per processed layer."""
    reports = []
    for i in range(start_layer, len(layers)):
        inputs, report = LayerQuantizer(i, layers[i], spec, opts, layer_kwargs).run(inputs)
        reports.append(report)
        if on_layer_done is not None:
            on_layer_done(i, layers[i], inputs, report)
        if progress is not None:
            progress(1)
    return reports
