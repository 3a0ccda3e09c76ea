"""``AutoAWQForCausalLM``: AutoAWQ's user API, unchanged, on top of awqkit's stages.

    from awqkit import AutoAWQForCausalLM
    model = AutoAWQForCausalLM.from_pretrained(model_path, device_map="auto", safetensors=True)
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"},
                   calib_data=data)
    model.save_quantized(quant_path, safetensors=True, shard_size="4GB")

Where awqkit differs from AutoAWQ (all documented in the README): calibration samples longer than a block are cut,
not dropped; the clip search scores every calibration token and refines each end of a zero-point range; GQA's v→o
pair is scaled too; block-output losses are measured on a subset of ``search_tokens`` tokens while activation
statistics and single-Linear losses use every token; every scale fold is checked; and bad input gets an
:class:`~awqkit.errors.AwqkitError` that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqkit.arch import ArchSpec, get_spec
from awqkit.awq.capture import layer_inputs
from awqkit.awq.pipeline import AwqOptions, LayerReport, run_awq
from awqkit.calib import calibration_blocks
from awqkit.errors import AwqkitError, ConfigError, DeviceMemoryError, ModelNotFoundError
from awqkit.formats.config import QuantConfig
from awqkit.formats.load import load_quantized_model
from awqkit.formats.save import save_checkpoint, write_checkpoint_dir
from awqkit.nn.convert import (
    convert_layer,
    decoder_layers,
    quantizable_linears,
    replace_with_awq_linears,
    resolve_group_size,
)

log = logging.getLogger(__name__)


def compute_device(device_map: Any) -> torch.device:
    """Where layers are processed: CUDA when there is one, unless the caller asked for the CPU."""
    if isinstance(device_map, torch.device):
        return device_map
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential"):
        return torch.device(device_map)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bf16 matmuls are ~2.5x fp32's."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _load_float_model(
    model_path: str, torch_dtype: Any, trust_remote_code: bool, safetensors: bool, gguf_file: str | None, **kwargs: Any
) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, **cfg_kwargs)
    except OSError as e:
        raise ModelNotFoundError(
            f"could not load a model config from {model_path!r}: {str(e).splitlines()[0]}. Pass a local model "
            "directory, a GGUF file (gguf_file=), or a hub id reachable from this machine."
        ) from None
    get_spec(config)  # unsupported architectures fail here, before any weight is read
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **kwargs}
    if gguf_file:
        load_kwargs["gguf_file"] = gguf_file
    else:
        load_kwargs["use_safetensors"] = safetensors
    model = AutoModelForCausalLM.from_pretrained(model_path, **load_kwargs)
    if getattr(model.config, "quantization_config", None) is not None and gguf_file:
        del model.config.quantization_config  # the GGUF tensors are dequantized: this is a float model now
    return model.eval()


class AutoAWQForCausalLM:
    """A causal LM to quantize with AWQ, or an AWQ checkpoint loaded for inference (AutoAWQ's API)."""

    def __init__(
        self,
        model: nn.Module,
        model_path: str | None = None,
        quant_config: QuantConfig | None = None,
        is_quantized: bool = False,
        device: torch.device | None = None,
    ):
        self.model = model
        self.model_path = model_path
        self.quant_config = quant_config
        self.is_quantized = is_quantized
        self.device = device or torch.device("cpu")
        self.report: dict[str, Any] | None = None
        self._scaled_only = False

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike,
        torch_dtype: Any = "auto",
        trust_remote_code: bool = False,
        safetensors: bool = True,
        device_map: Any = None,
        gguf_file: str | None = None,
        **model_init_kwargs: Any,
    ) -> AutoAWQForCausalLM:
        """Load a float model to quantize: a local directory, a hub id, or a GGUF file (``gguf_file=``).

        The weights stay on the CPU; ``device_map`` says where layers are processed during :meth:`quantize`
        (``"auto"``: CUDA if present). Only one decoder layer at a time is on that device.
        """
        path = str(model_path)
        if path.endswith(".gguf") and gguf_file is None:
            p = Path(path).expanduser()
            path, gguf_file = str(p.parent), p.name
        local = Path(path).expanduser()
        if not local.exists() and (path.count("/") != 1 or path.startswith((".", "/", "~"))):
            raise ModelNotFoundError(
                f"no model at {path!r}: pass a local directory, a GGUF file or a hub id (org/name)"
            )
        if gguf_file and not (local / gguf_file).is_file() and local.exists():
            raise ModelNotFoundError(f"no GGUF file {gguf_file!r} in {local}")
        model_init_kwargs.pop("low_cpu_mem_usage", None)
        model_init_kwargs.pop("use_cache", None)
        model = _load_float_model(path, torch_dtype, trust_remote_code, safetensors, gguf_file, **model_init_kwargs)
        return cls(model, model_path=path, device=compute_device(device_map))

    @classmethod
    def from_quantized(
        cls,
        quant_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> AutoAWQForCausalLM:
        """Load an AWQ checkpoint (ours, AutoAWQ's or a published one) for inference; ``.model`` gives logits."""
        device = compute_device(device_map)
        model = load_quantized_model(quant_path, device=device, dtype=torch_dtype)
        quant = QuantConfig.from_hf(model.config.quantization_config)
        return cls(model, model_path=str(quant_path), quant_config=quant, is_quantized=True, device=device)

    # -- inference -----------------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    __call__ = forward

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Transformers' ``generate`` on the wrapped model."""
        with torch.inference_mode():
            return self.model.generate(*args, **kwargs)

    # -- quantization --------------------------------------------------------------------------------------------
    def quantize(
        self,
        tokenizer: Any = None,
        quant_config: dict[str, Any] | QuantConfig | None = None,
        calib_data: Any = "pileval",
        split: str = "train",
        text_column: str = "text",
        duo_scaling: bool = True,
        export_compatible: bool = False,
        apply_clip: bool = True,
        n_parallel_calib_samples: int | None = None,
        max_calib_samples: int = 128,
        max_calib_seq_len: int = 512,
        max_chunk_memory: int = 1024**3,
        *,
        search_tokens: int = 2048,
        calib_dtype: torch.dtype | str = "auto",
        propagate_quantized: bool = False,
        resume_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        """Run AWQ with AutoAWQ's arguments and semantics (plus keyword-only awqkit options).

        Args:
            tokenizer: the model's tokenizer (for text calibration data).
            quant_config: ``{"zero_point", "q_group_size", "w_bit", "version", "modules_to_not_convert"}``.
            calib_data: list of strings or token-id lists, a local file, ``builtin:python-docs``, or a dataset name.
            duo_scaling, apply_clip: as in AutoAWQ.
            export_compatible: fold scales and clip but keep float weights (call :meth:`pack` later).
            n_parallel_calib_samples: sequences per forward pass (default: 16).
            max_calib_samples, max_calib_seq_len: at most this many blocks of this many tokens.
            max_chunk_memory: accepted for AutoAWQ compatibility (the clip search works on per-group Gram
                matrices, whose size does not grow with the calibration set, so it needs no chunking).
            search_tokens: tokens on which block-output losses are measured.
            calib_dtype: precision layers run in: "auto" = bfloat16 on CUDA and on CPUs that multiply bf16
                natively (AVX512-BF16/AMX: ~2.5x fp32's speed), else float32. Folds, clip search and quantization
                are always float32.
            propagate_quantized: feed each layer the quantized previous layers' outputs instead of the float ones
                (AutoAWQ's choice, and the default: with the clip search on every token it measured better on
                SmolLM2, and it saves one forward pass per layer — see benchmarks/README.md).
            resume_dir: keep per-layer progress there; a rerun with the same arguments continues after a kill.
            progress: show a progress bar.
        """
        if self.is_quantized:
            raise ConfigError("this model is already quantized; load the float model to quantize it again")
        quant = QuantConfig.from_autoawq(quant_config)
        spec = get_spec(self.model.config)
        group_size = resolve_group_size(quantizable_linears(self.model, spec, quant), quant.group_size)
        quant = QuantConfig(quant.w_bit, group_size, quant.zero_point, quant.version, quant.modules_to_not_convert)
        t0 = time.perf_counter()
        blocks = calibration_blocks(calib_data, tokenizer, max_calib_samples, max_calib_seq_len, split, text_column)
        opts = AwqOptions(
            group_size=group_size,
            zero_point=quant.zero_point,
            duo_scaling=duo_scaling,
            apply_clip=apply_clip,
            search_tokens=search_tokens,
            batch=n_parallel_calib_samples or 16,
            device=self.device,
            dtype=self._calib_dtype(calib_dtype),
            propagate_quantized=propagate_quantized,
        )
        del max_chunk_memory  # nothing to chunk (see awq.search.search_clip)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            reports = self._run(spec, quant, blocks, opts, export_compatible, resume_dir, progress)
        except torch.OutOfMemoryError:
            raise DeviceMemoryError(
                f"out of memory on {self.device} while quantizing; lower n_parallel_calib_samples (now {opts.batch}), "
                "max_calib_samples or max_calib_seq_len, or use device_map='cpu'"
            ) from None
        self.quant_config = quant
        self.is_quantized = not export_compatible
        self._scaled_only = export_compatible
        self.report = self._make_report(quant, blocks, reports, time.perf_counter() - t0)

    def _calib_dtype(self, calib_dtype: torch.dtype | str) -> torch.dtype:
        if isinstance(calib_dtype, torch.dtype):
            return calib_dtype
        if calib_dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
        try:
            return getattr(torch, calib_dtype)
        except AttributeError:
            raise ConfigError(f"unknown calib_dtype {calib_dtype!r}; use float32, bfloat16 or float16") from None

    def _run(
        self,
        spec: ArchSpec,
        quant: QuantConfig,
        blocks: torch.Tensor,
        opts: AwqOptions,
        export_compatible: bool,
        resume_dir: str | os.PathLike | None,
        progress: bool,
    ) -> list[LayerReport]:
        layers = decoder_layers(self.model, spec)
        inputs, kwargs = layer_inputs(self.model, layers, blocks, opts.device, torch.float32, opts.batch)
        saver = _Progress(resume_dir, quant, opts, blocks) if resume_dir else None
        start, earlier = 0, []
        if saver is not None:
            start, resumed_inputs, earlier = saver.restore(layers, spec, quant, export_compatible)
            if resumed_inputs is not None:
                inputs = resumed_inputs

        def finish_layer(i: int, layer: nn.Module, next_inputs: torch.Tensor, report: LayerReport) -> None:
            if not export_compatible:
                convert_layer(layer, spec, quant, f"{spec.layers}.{i}")
            if saver is not None:
                saver.save(i, layer, next_inputs, report)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(layers), initial=start, desc="AWQ", unit="layer")
        try:
            reports = run_awq(layers, spec, inputs, kwargs, opts, start, finish_layer, bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        return earlier + reports

    def _make_report(
        self, quant: QuantConfig, blocks: torch.Tensor, reports: list[LayerReport], seconds: float
    ) -> dict[str, Any]:
        return {
            "model_type": self.model.config.model_type,
            "quant_config": quant.to_hf(),
            "calibration": {"blocks": blocks.shape[0], "seq_len": blocks.shape[1], "tokens": blocks.numel()},
            "device": str(self.device),
            "seconds": seconds,
            "peak_rss_gb": peak_rss_gb(),
            "peak_gpu_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
            "layers": [r.to_dict() for r in reports],
        }

    def pack(self) -> None:
        """Quantize the scaled float weights left by ``quantize(export_compatible=True)``."""
        if not self._scaled_only:
            raise ConfigError("pack() follows quantize(..., export_compatible=True)")
        replace_with_awq_linears(self.model, self.quant_config)
        self.is_quantized, self._scaled_only = True, False

    # -- saving --------------------------------------------------------------------------------------------------
    def save_quantized(
        self,
        save_dir: str | os.PathLike,
        safetensors: bool = True,
        shard_size: str | int = "5GB",
        overwrite: bool = False,
    ) -> Path:
        """Write an AutoAWQ-GEMM checkpoint (config.json, generation_config.json, safetensors shards), atomically."""
        if not safetensors:
            log.warning("awqkit writes safetensors only; ignoring safetensors=False")
        if self._scaled_only:
            # AutoAWQ's export_compatible: a float checkpoint with the AWQ scales folded in
            from awqkit.formats.save import checkpoint_state_dict

            d = self.model.config.to_dict()
            d.pop("quantization_config", None)
            gen = self.model.generation_config.to_dict() if self.model.generation_config is not None else None
            return write_checkpoint_dir(
                save_dir, checkpoint_state_dict(self.model, torch.float16), d, gen, shard_size, overwrite
            )
        if not self.is_quantized or self.quant_config is None:
            raise ConfigError("nothing to save: call quantize() first (or load with from_quantized)")
        return save_checkpoint(self.model, save_dir, self.quant_config, shard_size=shard_size, overwrite=overwrite)


class _Progress:
    """Per-layer progress of a quantization run, so ``resume_dir`` continues after a kill with identical results.

    After layer ``i`` it stores that layer's finished tensors (``layer_{i}.safetensors``) and the next layer's
    inputs; a fingerprint of the settings and calibration tokens guards against resuming a different run.
    """

    def __init__(self, root: str | os.PathLike, quant: QuantConfig, opts: AwqOptions, blocks: torch.Tensor):
        self.root = Path(root)
        h = hashlib.sha256(json.dumps([quant.to_hf(), repr(opts)], sort_keys=True).encode())
        h.update(blocks.numpy().tobytes())
        self.fingerprint = h.hexdigest()

    def restore(
        self, layers: nn.ModuleList, spec: ArchSpec, quant: QuantConfig, export_compatible: bool
    ) -> tuple[int, torch.Tensor | None, list[LayerReport]]:
        from safetensors.torch import load_file

        state_file = self.root / "progress.json"
        if not state_file.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            return 0, None, []
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise AwqkitError(
                f"{self.root} holds progress of a different run (other model, settings or calibration data); "
                "delete it or drop --resume"
            )
        done = int(state["next_layer"])
        for i in range(done):
            if not export_compatible:
                convert_layer(layers[i], spec, quant, f"{spec.layers}.{i}")
            layers[i].load_state_dict(load_file(str(self.root / f"layer_{i:04d}.safetensors")), strict=True)
        inputs = load_file(str(self.root / f"inputs_{done:04d}.safetensors"))["inputs"]
        reports = [LayerReport(**r) for r in state["reports"]]
        log.info("resuming at layer %d of %d from %s", done, len(layers), self.root)
        return done, inputs, reports

    def save(self, i: int, layer: nn.Module, next_inputs: torch.Tensor, report: LayerReport) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in layer.state_dict().items()}, str(self.root / f"layer_{i:04d}.safetensors")
        )
        # the inputs file is named by the layer it feeds and progress.json switches to it atomically, so a kill at
        # any moment resumes with a matching (layer, inputs) pair
        save_file({"inputs": next_inputs.contiguous()}, str(self.root / f"inputs_{i + 1:04d}.safetensors"))
        state_file = self.root / "progress.json"
        reports = json.loads(state_file.read_text())["reports"] if state_file.is_file() else []
        state = {"fingerprint": self.fingerprint, "next_layer": i + 1, "reports": reports + [report.to_dict()]}
        tmp = self.root / "progress.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file)
        (self.root / f"inputs_{i:04d}.safetensors").unlink(missing_ok=True)
