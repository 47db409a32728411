"""What a member's node knows about itself: who it is, where its data and state live, and the
work of one round (load base once, tokenize private data once, train, encode the update)."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import fields, replace
from pathlib import Path

import torch

from aggregation.broadcast import OPT_PREFIX, PatchError, apply_patch, decode_step, split_view, step_view, view_digest
from aggregation.server_opt import ServerOptError, ServerOptimizer, check_state
from aggregation.codec_config import CodecConfig
from aggregation.feedback import ErrorFeedback
from aggregation.robust import clip_l2
from client import secure
from client.caches import read_residual, read_token_cache, read_view
from client.node_config import Node, NodeHints  # noqa: F401 - the names callers import from here
from model import families
from model.precision import select_precision
from client.trainer import TrainConfig, TrainResult, train_local
from protos.messages import LOCAL_OPTIMIZERS, ProtocolError, TrainInstruction, TrainReply
from model.base import Base, load_base
from model.member_data import Document, read_documents
from model.quantize import quantize_base
from model.quality import ROUNDS_PER_LEVEL, QualityReport, clean, curriculum_levels, grade
from model.io import atomic_write_json, save_tensors, tensors_from_bytes
from model.lora import LoraMoE
from model.tokenizer import pack_documents
from privacy.dp import Budget, sample_rate


# One base per process: Flower reuses a node's process across rounds, and a simulation actor
# serves several members in turn; the trainable state is reset from the message every round.
_LOADED: dict[tuple[str, str, str], tuple[Base, LoraMoE]] = {}


def load_member_model(base_path: Path, sha256: str, quantization: str = "none") -> tuple[Base, LoraMoE]:
    """The round's base (checked against its sha256) with the LoRA attached, its frozen weights
    quantized as the member chose (model/quantize.py), cached per process."""
    key = (str(base_path), sha256, quantization)
    if key not in _LOADED:
        base = load_base(base_path, expected_sha256=sha256)
        for other in [k for k in _LOADED if k[:2] != key[:2]]:  # another base: one per process
            del _LOADED[other]
        lora = base.with_lora()
        quantize_base(lora.model, quantization)
        _LOADED[key] = (base, lora)
    return _LOADED[key]


def member_blocks(node: Node, base: Base, seq_len: int, lora: LoraMoE | None = None, rnd: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The member's private data as (N, seq_len) token blocks and their labels (model/tokenizer.py:
    -100 where nothing is trained), cached in the node's state dir. With the data pipeline on,
    duplicates and junk are dropped first (report: <state-dir>/data-quality.json) and round `rnd`
    trains on the difficulty levels its curriculum has opened."""
    docs = read_documents(node.data_path, node.data_column)
    digest = hashlib.sha256(base.sha256.encode())
    for doc in docs:
        digest.update(hashlib.sha256(json.dumps([doc.text, doc.messages]).encode()).digest())
    levels = node.curriculum_levels if node.data_pipeline and lora is not None else 1
    opened = curriculum_levels(rnd, levels, ROUNDS_PER_LEVEL)
    pipeline = f"-q{opened}of{levels}" if node.data_pipeline else ""
    cache = node.state_dir / f"tokens-{seq_len}-{digest.hexdigest()[:16]}{pipeline}.safetensors"
    cached = read_token_cache(cache, seq_len) if cache.is_file() else None
    if cached is not None:
        return cached
    node.state_dir.mkdir(parents=True, exist_ok=True)
    if node.data_pipeline:
        report = QualityReport()
        docs = clean(docs, report)
        atomic_write_json(node.state_dir / QUALITY_REPORT, {"files": report.files, "kept": len(docs)})
    if levels > 1 and lora is not None:
        docs = [d for d, g in zip(docs, grade(base_losses(lora, base, docs, seq_len), levels), strict=True) if g < opened]
    blocks, labels = pack_documents(base.tokenizer, docs, seq_len, source=str(node.data_path))
    save_tensors(cache, {"blocks": blocks, "labels": labels})
    return blocks, labels


QUALITY_REPORT = "data-quality.json"


def base_losses(lora: LoraMoE, base: Base, docs: list[Document], seq_len: int) -> list[float]:
    """The frozen base's mean token loss on each document's first `seq_len` tokens (its difficulty)."""
    losses = []
    model = lora.model
    model.eval()  # the trainer puts it back in training mode
    with torch.no_grad(), model.disable_adapter():
        for doc in docs:
            ids = base.tokenizer(doc.content, add_special_tokens=False)["input_ids"][:seq_len]
            if len(ids) < 2:
                losses.append(0.0)
                continue
            batch = torch.tensor([ids])
            losses.append(float(model(input_ids=batch, labels=batch).loss))
    return losses


VIEW = "view.safetensors"


def view_path(node: Node, run: str) -> Path:
    """Where the member keeps its view of a run's global state: per run, so that two runs on one
    node do not overwrite each other's view (each would then get the full state every round)."""
    return node.state_dir / "views" / run / VIEW


class StaleView(RuntimeError):
    """The server sent a patch against a view this node does not hold (it resends in full)."""


def receive_state(ins: TrainInstruction, node: Node) -> dict[str, torch.Tensor]:
    """The member's new view of the global state: the full view, its last view + a patch, or its
    last view advanced by the server optimizer's step on the round's mean update (replayed here)."""
    payload = tensors_from_bytes(ins.state, source=f"round {ins.round} global state")
    if ins.state_kind == "full" and ins.server_optimizer:  # a "step" view: the optimizer state too
        view = {k: v if k.startswith(OPT_PREFIX) else v.to(torch.float32) for k, v in sorted(payload.items())}
        try:
            _check_step_view(view, ins)
        except ServerOptError as exc:
            raise ProtocolError(f"TRAIN full view: {exc}") from None
    elif ins.state_kind == "full":
        view = {k: v.to(torch.float32) for k, v in sorted(payload.items())}
    elif ins.state_kind in ("patch", "step"):
        path = view_path(node, ins.run)
        if not path.is_file():
            raise StaleView(f"{path}: no view to apply the round {ins.round} {ins.state_kind} to")
        held = read_view(path)
        if held is None:
            raise StaleView(f"{path}: held view is unreadable")
        if view_digest(held) != ins.base_view_sha256:
            raise StaleView(f"{path}: held view is not the one the round {ins.round} {ins.state_kind} is for")
        try:
            view = apply_patch(held, payload) if ins.state_kind == "patch" else replay_step(held, payload, ins)
        except (PatchError, ServerOptError) as exc:
            raise StaleView(str(exc)) from None
    else:
        raise StaleView(f"unknown state kind {ins.state_kind!r}")
    if view_digest(view) != ins.view_sha256:
        raise StaleView(f"round {ins.round}: view digest after applying the state does not match the server's")
    view_path(node, ins.run).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(view_path(node, ins.run), view)
    return split_view(view)[0] if ins.server_optimizer else view


def replay_step(held: dict[str, torch.Tensor], payload: dict[str, torch.Tensor], ins: TrainInstruction) -> dict[str, torch.Tensor]:
    """The server optimizer's step on the held (state, optimizer state), as the server took it."""
    optimizer = server_optimizer_of(ins)
    state, opt_state = split_view(held)
    delta = decode_step(payload, {k: tuple(v.shape) for k, v in state.items()})
    return step_view(*optimizer.step(state, delta, opt_state))


def server_optimizer_of(ins: TrainInstruction) -> ServerOptimizer:
    """The server optimizer TRAIN names, every field of its exact type, or ProtocolError."""
    try:
        settings = json.loads(ins.server_optimizer)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"TRAIN server_optimizer is not JSON ({type(exc).__name__})") from None
    kinds = {f.name: f.type for f in fields(ServerOptimizer)}
    if not isinstance(settings, dict) or set(settings) != set(kinds):
        raise ProtocolError(f"TRAIN server_optimizer must be an object with exactly the fields {', '.join(sorted(kinds))}")
    for name, value in settings.items():
        wanted = {"str": (str,), "int": (int,), "float": (int, float)}[str(kinds[name])]
        if isinstance(value, bool) or not isinstance(value, wanted) or (isinstance(value, float) and not math.isfinite(value)):
            raise ProtocolError(f"TRAIN server_optimizer {name} {str(value)[:40]!r} is not a finite {kinds[name]}")
    try:
        return ServerOptimizer(**settings)
    except OverflowError:
        raise ProtocolError("TRAIN server_optimizer holds a number out of range") from None


def _check_step_view(view: dict[str, torch.Tensor], ins: TrainInstruction) -> None:
    """A full "step" view's optimizer state fits its state (ServerOptError otherwise)."""
    state, opt_state = split_view(view)
    check_state(opt_state, {k: tuple(v.shape) for k, v in state.items()}, f"round {ins.round} full view")


def _residual_path(node: Node, ins: TrainInstruction, rnd: int) -> Path:
    codec = ins.codec.replace("+", "_")
    return node.state_dir / "error-feedback" / ins.run / f"{codec}-clip{ins.codec_clip:g}-round-{rnd:05d}.safetensors"


def compress_update(delta: dict[str, torch.Tensor], ins: TrainInstruction, node: Node, seed: int) -> bytes:
    """Encode the delta in the round's codec with error feedback kept in the node's state dir.

    What the codec drops this round (rounding, unsent coordinates) is added to a later round's
    delta. The residual is kept per run, codec and round (safetensors) and survives restarts:
    round R starts from the residual of the latest earlier round, so a round the server re-runs
    after a crash starts from exactly the same residual as the first time.
    """
    config = CodecConfig.parse(ins.codec, clip=ins.codec_clip or None)
    folder = _residual_path(node, ins, 0).parent
    prefix = _residual_path(node, ins, 0).name.removesuffix("00000.safetensors")
    earlier = sorted(p for p in folder.glob(f"{prefix}*.safetensors") if p < _residual_path(node, ins, ins.round))
    feedback = ErrorFeedback((read_residual(earlier[-1]) or {}) if earlier else {})
    generator = torch.Generator().manual_seed(seed)
    payload = feedback.compress(delta, config, seed=ins.codec_seed, generator=generator)
    save_tensors(_residual_path(node, ins, ins.round), feedback.residual)
    for old in earlier[:-1]:  # keep the one a re-run of this round needs
        old.unlink(missing_ok=True)
    return payload


def member_seed(seed: int, rnd: int, member: str) -> int:
    return (seed * 1_000_003 + rnd * 7919 + zlib.crc32(member.encode())) % (2**31)


def expert_load_of(ins: TrainInstruction, lora: LoraMoE) -> torch.Tensor | None:
    """The consortium's expert load to balance against (None: balance the member's own batch)."""
    if ins.balance == "member" or not ins.expert_load:
        return None
    if ins.balance != "consortium":
        raise ProtocolError(f"TRAIN: unknown balance {ins.balance!r}")
    if not 0 < ins.balance_weight <= 1:
        raise ProtocolError(f"TRAIN: balance-weight {ins.balance_weight} outside (0, 1]")
    config = lora.model.config
    shape = (int(config.num_hidden_layers), families.num_experts(config))
    try:
        load = tensors_from_bytes(ins.expert_load, source=f"round {ins.round} expert load")["load"]
    except (ValueError, KeyError) as exc:
        raise ProtocolError(f"TRAIN: expert load unreadable ({exc})") from None
    if tuple(load.shape) != shape or load.dtype != torch.float32:
        raise ProtocolError(f"TRAIN: expert load is {load.dtype} {tuple(load.shape)}, expected float32 {shape}")
    if not torch.isfinite(load).all() or (load < 0).any() or not torch.allclose(load.sum(dim=1), torch.ones(shape[0]), atol=1e-3):
        raise ProtocolError("TRAIN: expert load must hold non-negative fractions summing to 1 per layer")
    return load


def run_round(ins: TrainInstruction, node: Node) -> TrainReply:
    if ins.local_opt not in LOCAL_OPTIMIZERS:
        raise ProtocolError(f"TRAIN local_opt {ins.local_opt!r} is not one of {', '.join(LOCAL_OPTIMIZERS)}")
    base, lora = load_member_model(node.base_path, ins.base_sha256, node.base_quantization)
    blocks, labels = member_blocks(node, base, ins.seq_len, lora, ins.round)
    budget = Budget.load(node.state_dir, node.dp) if node.dp is not None else None
    steps, batch_size, lr = (node.dp.round_shape(ins.local_steps, ins.batch_size, ins.lr, ins.local_opt)
                             if node.dp is not None else (ins.local_steps, ins.batch_size, ins.lr))
    # BudgetSpent here: the member declines the round before it touches the data (client/app.py)
    dp = budget.plan(sample_rate(batch_size, blocks.shape[0]), steps) if budget is not None else None
    state = receive_state(ins, node)
    precision = select_precision(ins.precision, node.device)
    result = train_local(
        lora,
        state,
        blocks,
        TrainConfig(
            local_steps=steps,
            batch_size=batch_size,
            lr=lr,
            optimizer=ins.local_opt,
            seed=member_seed(ins.seed, ins.round, node.member),
            min_expert_tokens=ins.min_expert_tokens,
            expert_load=expert_load_of(ins, lora),
            balance_weight=ins.balance_weight,
            dp=dp,
        ),
        precision,
        labels=labels,
    )
    if budget is not None and dp is not None:  # written before the update leaves the node
        result = replace(result, dp_epsilon=budget.spend(dp, steps), dp_delta=budget.config.delta)
    quantized = f" on an {node.base_quantization} base" if node.base_quantization != "none" else ""
    return reply_for(result, ins, node, lora, precision.name + quantized)


def reply_for(result: TrainResult, ins: TrainInstruction, node: Node, lora: LoraMoE, precision: str) -> TrainReply:
    """The round's reply for a training result: the update encoded (or kept for the SecAgg stages)."""
    update_seed = member_seed(ins.seed, ins.round, node.member) + 1
    result = replace(result, delta=clip_l2(result.delta, ins.update_clip))
    identity = b""
    if ins.secure:
        # the update stays here: pre-scaled by its weights, compressed, kept for the SecAgg stages
        layout = secure.layout_for(lora, ins)
        counts = layout.weights(result.num_tokens, result.expert_tokens)
        payload = compress_update(layout.prescale(result.delta, counts), ins, node, update_seed)
        trained_from = f"view {ins.view_sha256} round {ins.round} seed {ins.seed}"
        secure.keep_input(node.state_dir, ins.run, ins.round, layout.encode(payload, counts), trained_from,
                          noise=secure.Noise(ins.dp_noise_variance, layout.update_elements))
        update, identity = b"", secure.public_bytes(secure.identity_key(node.state_dir))
    else:
        update = compress_update(result.delta, ins, node, update_seed)
    return TrainReply(
        member=node.member,
        round=ins.round,
        update=update,
        identity=identity,
        view_sha256=ins.view_sha256,
        expert_tokens={} if ins.secure else result.expert_tokens,  # under secure aggregation they travel masked
        num_tokens=result.num_tokens,
        num_examples=result.num_examples,
        train_loss=result.train_loss,
        seconds=result.seconds,
        precision=precision,
        dp_epsilon=result.dp_epsilon,
        dp_delta=result.dp_delta,
    )
