"""Weight-only quantised inference: the LLM's Linear weights stored as int8 or packed int4, through optimum-quanto.

    model = quantize_model(model, "int8")       # or "int4"; vision=True quantises the vision tower's Linears too
    print(quantization_report(model))           # bytes of the quantised Linear weights and of the LLM, before/after

What is stored (W: a Linear's (out, in) float weight; activations and the matmul stay in the model's float dtype):

- int8: symmetric, one scale per output row: s_o = max_i |W_oi| / 127, q_oi = round(W_oi / s_o) in [-127, 127],
  stored as an int8 tensor (1 byte a weight) plus the (out, 1) scales in the model's dtype; the layer computes
  y = x @ (q * s).T + b. About 1/4 of fp32's bytes (1/2 of bf16's), plus 4 / in_features for the scales.
- int4: asymmetric, per group of G consecutive input columns of a row: s = (max - min) / 15,
  q = clamp(round((W - min) / s), 0, 15), W ~ q * s + min; two 4-bit values are packed in
  each uint8 byte (0.5 byte a weight) plus one scale and one shift per group. G = 128 (optimum-quanto's choice:
  128, else the largest of 96 / 64 / 32 dividing in_features; a layer with in_features <= 128, or not divisible by
  32, gets one scale and shift per output row). About 1/8 of fp32's bytes plus 8 / G per weight (fp32 scales).
  On CPU a bf16 model's int4 layers (G = 128) use PyTorch's packed int4 matmul (`_weight_int4pack_mm_for_cpu`);
  other dtypes unpack the weights through optimum-quanto's C++ extension (compiled with ninja / g++ at its first
  use, about a minute, then cached in the installed package) and dequantise them for each matmul.
- Speed on CPU: with bf16 weights both modes run fused kernels (int8: `_weight_int8pack_mm` when in / out features
  are multiples of 32; int4: as above) and beat bf16; with fp32 weights the int codes are dequantised to fp32 for
  each matmul: the memory shrinks, but decoding is slower than fp32 (benchmarks/bench_quantize.py).

The LLM's Linear layers are quantised (an MPM model's `language_model`; a LLaVA model's `model.language_model`
and `lm_head`); the LM head too, unless it is tied to the input embeddings (quantising a tied head would add an int
copy beside the float matrix the embeddings keep). Embeddings, norms, the connector and (unless `vision`) the
vision tower stay in float. Every quantised layer is run once after quantisation: a mode the library cannot run
here (a missing kernel, an extension that does not compile) is a ConfigError naming the mode and the reason,
never a model left with float weights.

Why optimum-quanto (0.2.7): it stores real int8 and packed int4 weights and runs both on CPU. torchao 0.18 runs
int8 weight-only on CPU, but its int4 weight-only needs the GPU-only mslk kernels (plain / preshuffled formats) or
Arm KleidiAI (opaque formats), and its portable intx int4 keeps one int8 byte per 4-bit value (no packing).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from mpm.core.errors import ConfigError

MODES = ("int8", "int4")
INT4_GROUP_SIZE = 128  # optimum-quanto's group size for int4 weights (see the module docstring)
INSTALL_HINT = "pip install 'mpm-toolkit[quantize]' (optimum-quanto)"


@dataclass
class QuantizationReport:
    """Bytes actually stored, before and after: the quantised Linear layers' weights, and all of the LLM's
    parameters and buffers (embeddings, norms and biases included)."""

    mode: str
    layers: int
    linear_bytes_before: int
    linear_bytes_after: int
    llm_bytes_before: int
    llm_bytes_after: int

    @property
    def linear_ratio(self) -> float:
        return self.linear_bytes_after / max(self.linear_bytes_before, 1)

    @property
    def llm_ratio(self) -> float:
        return self.llm_bytes_after / max(self.llm_bytes_before, 1)

    def __str__(self) -> str:
        mib = 2**20
        return (
            f"{self.mode}: {self.layers} Linear layers {self.linear_bytes_before / mib:.1f} -> "
            f"{self.linear_bytes_after / mib:.1f} MiB ({self.linear_ratio:.1%}); LLM {self.llm_bytes_before / mib:.1f}"
            f" -> {self.llm_bytes_after / mib:.1f} MiB ({self.llm_ratio:.1%})"
        )


def _tensor_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly quantised subclass) tensor stores: quanto's QTensors, and their packed data,
    are wrapper subclasses whose `__tensor_flatten__` names the inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [part for name in names for part in _tensor_parts(getattr(t, name))]


def tensor_bytes(tensors) -> int:
    """Bytes the tensors store (each underlying tensor counted once: a tied weight is one matrix)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        for part in _tensor_parts(t):
            key = (part.data_ptr(), part.nbytes)
            if key not in seen:
                seen.add(key)
                total += part.nbytes
    return total


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (int8 / packed int4 data, scales and shifts included)."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def llm_of(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the decoder to quantise, the LM head when it is outside it) for an MPM, LLaVA or plain causal LM."""
    if hasattr(model, "language_model") and isinstance(model.language_model, nn.Module):  # MPM: a whole causal LM
        return model.language_model, None
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "language_model", None), nn.Module):  # LLaVA
        return inner.language_model, getattr(model, "lm_head", None)
    return model, None  # a causal LM on its own


def vision_of(model: nn.Module) -> nn.Module | None:
    tower = getattr(model, "vision_tower", None)
    if tower is None:
        tower = getattr(getattr(model, "model", None), "vision_tower", None)
    return tower


def _targets(model: nn.Module, vision: bool) -> list[str]:
    """Names (in `model`) of the Linear layers to quantise."""
    llm, head = llm_of(model)
    parts = [llm] + ([head] if head is not None else [])
    if vision:
        tower = vision_of(model)
        if tower is None:
            raise ConfigError(f"quantize vision=True: {type(model).__name__} has no vision tower")
        parts.append(tower)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = getattr(embedding, "weight", None)
    wanted = {id(m) for part in parts for m in part.modules() if isinstance(m, nn.Linear)}
    return [
        name
        for name, m in model.named_modules()
        if id(m) in wanted and not (tied is not None and m.weight is tied)  # a head tied to the embeddings stays
    ]


def _quanto():
    try:
        quanto = importlib.import_module("optimum.quanto")
    except ImportError as exc:
        raise ConfigError(f"weight quantisation needs optimum-quanto ({exc}): {INSTALL_HINT}") from None
    return quanto


def check_mode(mode: str) -> None:
    """ConfigError unless `mode` is a known mode and the library is installed (before loading a model)."""
    if mode not in MODES:
        raise ConfigError(f"quantize={mode!r}: unknown mode; choose one of {', '.join(MODES)}")
    _quanto()


def quantize_model(model: nn.Module, mode: str, vision: bool = False) -> nn.Module:
    """Quantise `model`'s LLM Linear weights in place to `mode` ("int8" or "int4"; see the module docstring),
    with the vision tower's Linears too when `vision`; returns the model, with `quantization_report(model)` set.
    Unknown mode, missing library, or a mode that cannot run on the model's device and dtype: ConfigError."""
    check_mode(mode)
    quanto = _quanto()
    qtype = {"int8": quanto.qint8, "int4": quanto.qint4}[mode]
    llm, head = llm_of(model)
    llm_parts = [llm] + ([head] if head is not None else [])
    names = _targets(model, vision)
    if not names:
        raise ConfigError(f"quantize={mode}: {type(model).__name__} has no Linear layers to quantise")
    modules = dict(model.named_modules())
    if any(isinstance(modules[n].weight, quanto.QTensor) or isinstance(modules[n], quanto.QModuleMixin) for n in names):
        raise ConfigError(f"quantize={mode}: the model is already quantised")
    linear_before = tensor_bytes([modules[n].weight for n in names])
    llm_before = tensor_bytes([t for p in llm_parts for t in [*p.parameters(), *p.buffers()]])

    for name in names:  # one at a time: an error names its layer
        weight = modules[name].weight  # (quanto empties the float module it replaces)
        try:
            quanto.quantize(model, weights=qtype, include=name)
            layer = model.get_submodule(name)
            layer.freeze()
        except Exception as exc:  # the library refuses this layer's shape, dtype or device
            raise ConfigError(
                f"quantize={mode} cannot quantise layer {name} ({weight.shape[0]} x {weight.shape[1]}, "
                f"{str(weight.dtype).removeprefix('torch.')} on {weight.device.type}): {_first_line(exc)}"
                f"{INT4_BF16_CPU_HINT if mode == 'int4' and weight.dtype == torch.bfloat16 else ''}"
            ) from exc
        if not isinstance(layer.weight, quanto.QTensor):  # never a silent fallback to float weights
            raise ConfigError(f"quantize={mode}: layer {name} kept float weights ({type(layer.weight).__name__})")
        _check_runs(layer, name, mode)
    model.quantization_report = QuantizationReport(
        mode=mode,
        layers=len(names),
        linear_bytes_before=linear_before,
        linear_bytes_after=tensor_bytes([model.get_submodule(n).weight for n in names]),
        llm_bytes_before=llm_before,
        llm_bytes_after=0,  # measured when asked: quantization_report
    )
    return model


INT4_BF16_CPU_HINT = (
    "; int4 with bf16 weights on CPU goes through PyTorch's packed int4 kernel, which needs out_features divisible "
    "by 16: load the model in float32 (dtype=torch.float32) to get optimum-quanto's generic int4 layers"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@torch.no_grad()
def _check_runs(layer: nn.Module, name: str, mode: str) -> None:
    """One matmul through the quantised layer, on its device and dtype: the kernel (or the int4 unpacking
    extension, compiled at its first use) must exist here."""
    weight = layer.weight
    x = torch.zeros(1, layer.in_features, dtype=weight.dtype, device=weight.device)
    try:
        layer(x)
    except Exception as exc:
        where = f"{weight.device.type} with {str(weight.dtype).removeprefix('torch.')} weights"
        raise ConfigError(
            f"quantize={mode} cannot run on {where} (layer {name}, in_features {layer.in_features}): "
            f"{_first_line(exc)}; use another --quantize mode or dtype"
        ) from exc


def quantization_report(model: nn.Module) -> QuantizationReport:
    """Bytes of the quantised Linear weights and of the whole LLM, before and after `quantize_model`."""
    report = getattr(model, "quantization_report", None)
    if not isinstance(report, QuantizationReport):
        raise ConfigError("quantization_report: this model was not quantised with mpm.quantize.quantize_model")
    llm, head = llm_of(model)  # again: quantisation replaced the Linear modules (a LLaVA lm_head among them)
    parts = [llm] + ([head] if head is not None else [])
    report.llm_bytes_after = tensor_bytes([t for p in parts for t in [*p.parameters(), *p.buffers()]])
    return report
