"""LoRA on the MoE (peft) and the *trainable state* that members train and the server averages.

FFA-LoRA: every adapter's A is frozen at values the operator fixes once (saved next to the base
model), only B is trained. Then the average of the members' updates B_i A is (avg B_i) A, so
averaging B is exact; averaging A and B separately would not be.

Experts get one LoRA each through peft's `target_parameters` on the fused expert tensors. peft
lays the per-expert factors out interleaved: for E experts and rank r, `lora_B` is (out, r*E)
and expert e owns columns e, e+E, e+2E, ... (`B.reshape(out, r, E)[..., e]`). The trainable
state splits them into one tensor per expert so that each expert can be sent, skipped and
averaged on its own.

The output head can get a LoRA too (`train_head`; on in the bases `fedmoe init` builds): on the demo's small base it is
worth about twice the perplexity drop of attention and experts alone at equal steps (centralized,
240 steps: the weakest domain 3.1% -> 7.5%), since a domain's vocabulary is what a general base
knows least. The head's weight is tied to the input embedding; the adapter changes only the
output side, so a release's merged model unties the head first (server/release.py): merged
into the tied weight, it would change the embedding as well.

Shared experts and dense MLPs get one LoRA per projection (`train_shared_mlp`; on in the bases
`fedmoe init` builds): Qwen2-MoE `mlp.shared_expert.*`, DeepSeek-V3 `mlp.shared_experts.*`, and
the dense layers' `mlp.{gate,up,down}_proj` (DeepSeek-V3's first `first_k_dense_replace`, Qwen's
`mlp_only_layers`). Every token passes through them, so they are shared tensors, aggregated by
the member's tokens like attention. They are attached through `target_parameters` on each
Linear's `weight`, not as `target_modules`: peft 0.21 under transformers 5 rewrites any target
module named `gate_proj`/`up_proj`/`down_proj` (a list entry or a regex alike: it resolves a regex
to leaf names first) into the fused routed experts, for the families it converts like Qwen2-MoE
(DeepSeek-V3, Qwen3-MoE, OLMoE; `_convert_peft_config_moe`, for adapters trained under
transformers 4), both when the LoRA is attached and when a release's adapter is loaded;
`target_parameters` it leaves alone. A 2-D parameter gets one adapter (peft's `ParamWrapper`
with one "expert"): the same W + s B A as a `lora.Linear`, formed as a weight on every forward
as for the experts (`merged` folds it once for an evaluation). Qwen2-MoE's `shared_expert_gate`
(Linear(H, 1): a sigmoid per token that scales the shared expert's output) trains in full, as the
router does (`modules_to_save = ["gate"]` matches it by suffix, in every base, old ones too): a
rank-r LoRA of a one-row weight would hold more (A is r x H) and reach only an r-dimensional slice
of it, and a full weight averages exactly.

Canonical trainable-state names (no peft prefixes):
    model.layers.{l}.self_attn.{q,k,v,o}_proj.lora_B              (out, r)   shared adapter
    model.layers.{l}.mlp.experts.{gate_up_proj,down_proj}.lora_B.e{e}  (out, r) expert e
    model.layers.{l}.mlp.gate.weight                               (E, H)    router
    model.layers.{l}.mlp.shared_expert.{gate,up,down}_proj.lora_B  (out, r)   Qwen2-MoE shared expert
    model.layers.{l}.mlp.shared_expert_gate.weight                 (1, H)    its gate, in full
    model.layers.{l}.mlp.shared_experts.{gate,up,down}_proj.lora_B (out, r)   DeepSeek-V3 shared experts
    model.layers.{l}.mlp.{gate,up,down}_proj.lora_B                (out, r)   a dense layer's MLP
    lm_head.lora_B                                                 (V, r)    output head
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.utils.other import ModulesToSaveWrapper
from transformers import PreTrainedModel

from model.families import UnsupportedModel, role_of

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
SHARED_MLP_PARAMETERS = tuple(f"mlp.{owner}{proj}_proj.weight" for owner in ("shared_expert.", "shared_experts.", "")
                              for proj in ("gate", "up", "down"))  # matched as suffixes: "mlp.gate_proj.weight" is dense only
ROUTER_MODULE = "gate"
HEAD_MODULE = "lm_head"
ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."
_EXPERT_KEY = re.compile(r"layers\.(\d+)\..*\.lora_B\.e(\d+)$")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: int = 16
    train_router: bool = True
    train_head: bool = False  # `fedmoe init` turns it on for the bases it builds (server/init.py)
    train_shared_mlp: bool = False  # likewise; bases built before it have none of its frozen A

    def to_peft(self, parameter_names: Iterable[str]) -> LoraConfig:
        """The peft config for a model with these parameters: the shared-MLP targets it has, if any
        (a Mixtral's adapter config lists none)."""
        names = list(parameter_names)
        shared = [t for t in SHARED_MLP_PARAMETERS if self.train_shared_mlp and any(n.endswith(f".{t}") for n in names)]
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            target_modules=list(ATTENTION_MODULES) + ([HEAD_MODULE] if self.train_head else []),
            target_parameters=list(EXPERT_PARAMETERS) + shared,
            modules_to_save=[ROUTER_MODULE] if self.train_router else None,
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


KINDS = ("attention", "experts", "router", "head")  # the trainable state's parameter kinds


def kind_of(name: str) -> str:
    """The kind of a trainable-state tensor (canonical name): one of KINDS."""
    role = role_of(name)  # UnsupportedModel for a name no family rule describes, never a guess
    if role == "routed_expert":
        if not _EXPERT_KEY.search(name):
            raise UnsupportedModel(f"routed-expert tensor {name!r} is not split per expert (no .lora_B.e<e>)")
        return "experts"
    if role in ("router", "head"):
        return role
    return "attention"  # attention, shared experts, dense MLPs: shared, aggregated by the member's tokens


def expert_of(name: str) -> str | None:
    """'l:e' for a per-expert trainable tensor, None for shared ones (adapters, router)."""
    match = _EXPERT_KEY.search(name)
    return f"{match.group(1)}:{match.group(2)}" if match else None


@dataclass(frozen=True)
class _Slot:
    param: torch.nn.Parameter
    expert: int | None  # column group of an interleaved per-expert lora_B
    num_experts: int

    def _part(self, data: torch.Tensor) -> torch.Tensor:
        """This slot's part of `data` (the parameter or its gradient), as a copy."""
        if self.expert is None:
            return data.clone()
        return data.reshape(data.shape[0], -1, self.num_experts)[..., self.expert].clone()  # (out, r)

    def read(self) -> torch.Tensor:
        return self._part(self.param.detach())

    def read_grad(self) -> torch.Tensor:
        grad = self.param.grad
        if grad is None:
            return torch.zeros(self.read().shape, dtype=torch.float32)
        return self._part(grad.detach()).float()

    def add_grad(self, value: torch.Tensor) -> None:
        """Add `value` (shaped as `read()`) to this slot's part of the parameter's gradient."""
        param = self.param
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        with torch.no_grad():
            value = value.to(param.grad.device, param.grad.dtype)
            if self.expert is None:
                param.grad.add_(value)
            else:
                param.grad.view(param.shape[0], -1, self.num_experts)[..., self.expert] += value

    def write(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            value = value.to(self.param.dtype)
            if self.expert is None:
                self.param.copy_(value)
            else:
                out = self.param.shape[0]
                self.param.view(out, -1, self.num_experts)[..., self.expert] = value


def _attach(base: PreTrainedModel, spec: LoraSpec) -> PeftModel:
    with warnings.catch_warnings():
        # peft warns whenever a tied layer is adapted; the head's adapter is deliberately untied
        # (module docstring) and a release unties the head before merging (server/release.py).
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*", category=UserWarning)
        return get_peft_model(base, spec.to_peft(name for name, _ in base.named_parameters()))


def _canonical(module_name: str) -> str:
    name = module_name.removeprefix(_PEFT_PREFIX)
    return name.replace(".base_layer", "")


def _walk(model: PeftModel) -> tuple[dict[str, _Slot], dict[str, torch.nn.Parameter]]:
    """(trainable slots by canonical name, frozen lora_A parameters by canonical name)."""
    slots: dict[str, _Slot] = {}
    frozen_a: dict[str, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ParamWrapper) and module.parameter_name == "weight":  # a shared expert's or dense Linear
            base = _canonical(module_name)
            slots[f"{base}.lora_B"] = _Slot(module.lora_B[ADAPTER].weight, None, 1)
            frozen_a[f"{base}.lora_A"] = module.lora_A[ADAPTER].weight
        elif isinstance(module, ParamWrapper):
            base = f"{_canonical(module_name)}.{module.parameter_name}"
            b = module.lora_B[ADAPTER].weight
            for e in range(module.num_experts):
                slots[f"{base}.lora_B.e{e}"] = _Slot(b, e, module.num_experts)
            frozen_a[f"{base}.lora_A"] = module.lora_A[ADAPTER].weight
        elif isinstance(module, LoraLayer):
            base = _canonical(module_name)
            slots[f"{base}.lora_B"] = _Slot(module.lora_B[ADAPTER].weight, None, 1)
            frozen_a[f"{base}.lora_A"] = module.lora_A[ADAPTER].weight
        elif isinstance(module, ModulesToSaveWrapper):
            copy = module.modules_to_save[ADAPTER]
            for pname, param in copy.named_parameters():
                slots[f"{_canonical(module_name)}.{pname}"] = _Slot(param, None, 1)
    return dict(sorted(slots.items())), dict(sorted(frozen_a.items()))


def _mergeable(weight: object) -> bool:
    """A plain float tensor on the CPU: what `LoraMoE.merged` folds an adapter into."""
    return (isinstance(weight, torch.nn.Parameter) and type(weight.data) is torch.Tensor
            and weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and weight.device.type == "cpu")


class LoraMoE:
    """A base MoE with the fedmoe LoRA attached; reads and writes the trainable state."""

    def __init__(self, base: PreTrainedModel, spec: LoraSpec, lora_init: Mapping[str, torch.Tensor]):
        self.spec = spec
        self.model: PeftModel = _attach(base, spec)
        self._slots, frozen_a = _walk(self.model)
        missing = sorted(set(frozen_a) - set(lora_init))
        if missing:
            raise ValueError(f"LoRA init lacks {len(missing)} tensors, first: {missing[0]}")
        for name, param in frozen_a.items():
            if tuple(lora_init[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"LoRA init tensor {name} has shape {tuple(lora_init[name].shape)}, "
                    f"expected {tuple(param.shape)} (rank or model mismatch)"
                )
            with torch.no_grad():
                param.copy_(lora_init[name])
        for param in self.model.parameters():
            param.requires_grad_(False)
        for slot in self._slots.values():
            slot.param.requires_grad_(True)

    @staticmethod
    def make_lora_init(base: PreTrainedModel, spec: LoraSpec, *, seed: int) -> dict[str, torch.Tensor]:
        """The frozen A matrices, drawn once by the operator (peft's default init, seeded). The head's
        and the shared MLPs' are drawn apart (seed + 1, seed + 2), so that turning either on leaves
        every other adapter's A as it was without it."""
        plain = replace(spec, train_head=False, train_shared_mlp=False)
        init = LoraMoE._draw_a(base, plain, seed)
        for flag, offset in (("train_head", 1), ("train_shared_mlp", 2)):
            if getattr(spec, flag):
                drawn = LoraMoE._draw_a(base, replace(plain, **{flag: True}), seed + offset)
                init.update({name: a for name, a in drawn.items() if name not in init})
        return dict(sorted(init.items()))

    @staticmethod
    def _draw_a(base: PreTrainedModel, spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        probe = _attach(base, spec)
        _, frozen_a = _walk(probe)
        init = {name: p.detach().clone().contiguous() for name, p in frozen_a.items()}
        probe.unload()  # give the base model back untouched
        return init

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(slot.read().shape) for name, slot in self._slots.items()}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        unique = {id(s.param): s.param for s in self._slots.values()}
        return list(unique.values())

    def get_state(self) -> dict[str, torch.Tensor]:
        return {name: slot.read().float() for name, slot in self._slots.items()}

    def get_grad(self) -> dict[str, torch.Tensor]:
        """The trainable tensors' accumulated gradients, named and shaped as `get_state` (zeros where none)."""
        return {name: slot.read_grad() for name, slot in self._slots.items()}

    def add_to_grad(self, named: Mapping[str, torch.Tensor]) -> None:
        """Add tensors named and shaped as `get_state` to the trainable tensors' gradients."""
        for name, value in self._known(named).items():
            self._slots[name].add_grad(value)

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, value in self._known(state).items():
            self._slots[name].write(value)

    def _known(self, named: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """`named` when every name is a trainable tensor's, else KeyError naming the first that is not."""
        unknown = sorted(set(named) - set(self._slots))
        if unknown:
            raise KeyError(f"unknown trainable tensor {unknown[0]!r}")
        return named

    @contextmanager
    def merged(self) -> Iterator[PeftModel]:
        """The model with the experts' adapters folded into the expert weights while inside, for
        evaluation only (no gradients reach the trainable state); the shared experts' and dense
        MLPs' too, which peft holds the same way. Unmerged, peft folds W + B A into
        each expert stack on every forward, in W's dtype; merged once, an evaluation of the demo's
        validation sets takes 2.8 s instead of 3.2 s (bf16 autocast, the default on CPU) and gives
        bit-identical losses. peft's safe merge writes each merged weight to a new tensor, so on
        exit every expert weight is given its original tensor back, bit for bit; an unmerge would
        subtract the delta again and round.
        Left as they are: the attention and head adapters (under bf16 autocast a merged weight
        rounds otherwise than the base and its adapter do apart; the head's weight is the tied
        embedding), weights off the CPU (the merged copies would double the experts' GPU memory),
        anything but a plain float tensor (quantized or tensor-subclass weights), and a merge that
        peft refuses for non-finite values (its loss stays non-finite)."""
        restored: list[tuple[LoraLayer, torch.nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for layer in self.model.modules():
                    if type(layer) is not ParamWrapper or layer.merged:
                        continue
                    weight = getattr(layer.get_base_layer(), layer.parameter_name, None)
                    if not _mergeable(weight):
                        continue
                    original = weight.data
                    try:
                        layer.merge(safe_merge=True)
                    except ValueError:  # non-finite: evaluated unmerged, so its loss says so
                        continue
                    restored.append((layer, weight, original))
            yield self.model
        finally:
            for layer, weight, original in restored:
                layer.merged_adapters.clear()  # the adapter runs again, on the original weight below
                weight.data = original

    def trainable_fraction(self) -> float:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return trainable / total
