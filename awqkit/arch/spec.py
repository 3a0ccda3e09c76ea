"""How a model family is declared: which Linears share an input, and what their scales fold into.

AWQ rescales the input channels of Linears that read the same activation: ``y = W x = (W·diag(s)) (x / s)``.
The division by ``s`` has to be absorbed by whatever produced ``x`` — a norm's weight or the previous Linear's
output rows — so the float model is unchanged and only the quantization error moves. A family is therefore a few
lines of data (after llm-compressor's ``AWQMapping``): the search in :mod:`awqkit.awq` never names a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of ``prev``; their input channels share one scale vector.

    Attributes:
        prev: path (inside a decoder layer) of the op producing the shared input: a norm or a Linear.
        linears: paths of the Linears reading it.
        inspect: the module whose output the scale search keeps close to float (a block containing the linears);
            ``None`` means the single Linear itself. A larger block lets the search see how errors interact.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """One family's AWQ structure.

    Attributes:
        name: family name shown to users.
        model_types: ``config.model_type`` values this declaration serves.
        layers: path of the decoder-layer list in the ``*ForCausalLM`` model.
        groups: scale groups in forward order. A Linear→Linear group is used only where the fold is possible: the
            previous Linear's outputs are the next one's inputs, or (GQA's v→o) each feeds a known set of them
            (:func:`awqkit.awq.fold.channel_map`).
        no_clip: Linear names whose clip search is skipped (q/k: their error is amplified by the softmax and
            AutoAWQ found clipping them hurts).
        norm_offset: 1.0 for Gemma-style norms computing ``x * (1 + w)``; the fold then keeps that form.
    """

    name: str
    model_types: tuple[str, ...]
    groups: tuple[ScaleGroup, ...]
    layers: str = "model.layers"
    no_clip: tuple[str, ...] = ("q_proj", "k_proj")
    norm_offset: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized Linear of a decoder layer, in forward order."""
        return tuple(name for g in self.groups for name in g.linears)
