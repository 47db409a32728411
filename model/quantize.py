"""A member's frozen base held in int8 or 4-bit NF4, with the LoRA trained on top (QLoRA-style).

A member chooses it in its node config (`base-quantization`), since each member's hardware
differs. Only the frozen base changes: the trainable state (the LoRA's B, the router, the head
adapter) stays in float32, so an update from a quantized member aggregates with the others as
it is, and the consortium's release is merged into the base's own dtype on the operator's side.

The quantization itself is bitsandbytes' (`int8_vectorwise_quant`: one absmax scale per row, as
LLM.int8(); `quantize_4bit` NF4 with 64-value blocks, as QLoRA); both run on CPU and CUDA. What is
hand-written is the wiring, because no library quantizes the weights this model has:
bitsandbytes' `Linear8bitLt`/`Linear4bit`, optimum-quanto and torchao replace `nn.Linear`
modules, while transformers 5 keeps each MoE layer's experts as fused 3-D parameters
(`mlp.experts.gate_up_proj` (E, 2I, H)) that peft adapts through `target_parameters`, by
registering a parametrization on that parameter at every forward. A second parametrization
there breaks peft 0.21's removal of its own (it looks only for `_LoraParameterProxy`, while one
adapter over many experts registers a `_LoraFactorsProxy`), so this module does not
parametrize: it keeps every quantized weight's codes as buffers of its `QuantizedWeight`, leaves
an empty placeholder where the weight was, and materializes the weight, dequantized to the
compute dtype, in a forward pre-hook of the outermost module that reads it (peft's wrapper
where there is one), putting the placeholder back after the forward. The dequantized weight
lives while its layer runs and while autograd holds it for the backward; with gradient
checkpointing on (`quantize_base` turns it on) a layer's weights are dequantized again in the
backward instead of being held from the forward, so the float copy of the whole base never exists.

Quantized: every weight of two or more dimensions (attention projections, routed and shared
experts, dense MLPs, the embedding and the output head) except the router, which is trained.
Norms and biases stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCK = 64


class QuantizationError(ValueError):
    """A base quantization that cannot be used here (unknown name, library missing)."""


def _bnb() -> Any:
    try:
        import bitsandbytes.functional as functional
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise QuantizationError(f"base-quantization needs bitsandbytes ({exc})") from None
    return functional


class QuantizedWeight(nn.Module):
    """One frozen weight's codes and scales (buffers, so `.to(device)` moves them), and its dequantization."""

    def __init__(self, weight: torch.Tensor, mode: str):
        super().__init__()
        functional = _bnb()
        self.mode = mode
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        data = weight.detach().float()
        if mode == "int8":
            codes, absmax, _ = functional.int8_vectorwise_quant(data.reshape(-1, self.shape[-1]).contiguous())
            self.register_buffer("codes", codes)  # (rows, in) int8
            self.register_buffer("absmax", absmax)  # (rows,) float32: a row's largest |value| is 127
            self.register_buffer("code", torch.empty(0))
        elif mode == "nf4":
            codes, state = functional.quantize_4bit(data.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
            self.register_buffer("codes", codes)  # (numel / 2, 1) uint8: two 4-bit values per byte
            self.register_buffer("absmax", state.absmax)  # (numel / 64,) float32
            self.register_buffer("code", state.code)  # (16,) the NF4 values
        else:
            raise QuantizationError(f"base-quantization {mode!r} is not one of {', '.join(QUANTIZATIONS)}")

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        functional = _bnb()
        if self.mode == "int8":
            weight = functional.int8_vectorwise_dequant(self.codes, self.absmax)
        else:
            state = functional.QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                                          blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
            weight = functional.dequantize_4bit(self.codes, state)
        return weight.reshape(self.shape).to(dtype)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.codes, self.absmax, self.code))


@dataclass(frozen=True)
class _Slot:
    owner: nn.Module  # the module the weight is an attribute of (Linear, Embedding, an experts block)
    name: str  # its attribute name there ("weight", "gate_up_proj", ...)
    quantized: QuantizedWeight


@dataclass(frozen=True)
class QuantizedBase:
    """What `quantize_base` did: the mode, the weights it quantized and their bytes before and after."""

    mode: str
    weights: int
    bytes_before: int
    bytes_after: int


def _quantizable(name: str, param: torch.Tensor) -> bool:
    """A frozen base weight: not a LoRA factor (the frozen A included), not the router (trained)."""
    return param.dim() >= 2 and not param.requires_grad and "lora_" not in name and ".mlp.gate." not in f".{name}"


def _unwrapped(module: nn.Module) -> nn.Module:
    while hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
        module = module.get_base_layer()
    return module


def quantize_base(model: nn.Module, mode: str, *, checkpointing: bool = True) -> QuantizedBase:
    """Quantize the frozen weights of `model` (a peft model or a plain one) in place.

    Call it after the LoRA is attached (the trainable tensors must already be marked trainable)
    and with the model on the device it trains on or on CPU: the codes move with `.to()`.
    """
    if mode not in QUANTIZATIONS:
        raise QuantizationError(f"base-quantization {mode!r} is not one of {', '.join(QUANTIZATIONS)}")
    if mode == "none":
        return QuantizedBase(mode, 0, 0, 0)
    owners: dict[int, nn.Module] = {}  # the plain module behind each wrapper -> the outermost module reading it
    for module in model.modules():  # parents first: a wrapper is met before the module it wraps
        owners.setdefault(id(_unwrapped(module)), module)
    done: dict[int, QuantizedWeight] = {}  # a tied weight (embedding and head) is quantized once
    slots: dict[int, list[_Slot]] = {}
    hooked: dict[int, nn.Module] = {}
    before = after = 0
    for module_name, module in list(model.named_modules()):
        for name, param in list(module.named_parameters(recurse=False)):
            if not _quantizable(f"{module_name}.{name}", param):
                continue
            key = id(param)
            if key not in done:
                done[key] = QuantizedWeight(param, mode)
                before += param.numel() * param.element_size()
                after += done[key].storage_bytes()
            quantized = done[key]
            module.register_module(f"fedmoe_{name}_{mode}", quantized)
            delattr(module, name)  # a buffer from now on: peft parametrizes parameters and buffers only
            module.register_buffer(name, _placeholder(quantized), persistent=False)
            outer = owners.get(id(module), module)
            slots.setdefault(id(outer), []).append(_Slot(module, name, quantized))
            hooked[id(outer)] = outer
    for key, outer in hooked.items():
        outer.register_forward_pre_hook(_materialize(slots[key]))
        outer.register_forward_hook(_release(slots[key]))
    if checkpointing:
        _checkpoint_layers(model)
    return QuantizedBase(mode, len(done), before, after)


def _checkpoint_layers(model: nn.Module) -> None:
    """transformers' activation checkpointing: non-reentrant (the frozen embedding needs no input
    grads), and recomputing a layer to its end (torch stops a recomputation early, once it has the
    tensors the backward needs, and the weights' release hooks would then never run)."""
    kwargs = {"use_reentrant": False, "early_stop": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _placeholder(quantized: QuantizedWeight) -> torch.Tensor:
    """What sits where the weight was between forwards: empty, on the codes' device, in its dtype."""
    return torch.empty(0, dtype=quantized.dtype, device=quantized.codes.device)


def _materialize(slots: list[_Slot]) -> Any:
    def hook(module: nn.Module, args: Any) -> None:
        for slot in slots:
            setattr(slot.owner, slot.name, slot.quantized.dequantize(slot.quantized.dtype))
    return hook


def _release(slots: list[_Slot]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        for slot in slots:  # autograd keeps what it saved; the module forgets its float copy
            setattr(slot.owner, slot.name, _placeholder(slot.quantized))
    return hook


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes the frozen base takes at rest, counted tensor by tensor, each once: its parameters and
    buffers (the codes and scales of a quantized base among them), not the LoRA or anything trained."""
    seen: set[int] = set()
    total = 0
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in seen or tensor.requires_grad or "lora_" in name:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total
