"""Byte-level BPE tokenizer training, and packing of documents into fixed-length token blocks.

Byte-level BPE (GPT-2 style) encodes any Unicode text without an unknown token, so member data
never loses characters. Packing joins documents with `<|endoftext|>` and cuts the stream into
(num_blocks, seq_len) blocks: no padding. Plain text is trained on every token; chat and
instruction documents (model/member_data.py) only on the assistant's turns: their other tokens
get the label -100, which the loss ignores.

Conversations are rendered with the tokenizer's chat template when it has one (one rendering per
assistant turn, so that each turn's span is exactly what the template adds for it; a template
that does not render a conversation as a growing prefix falls back to the plain template), else
with the plain template:

    ### System:\n{content}\n\n### User:\n{content}\n\n### Assistant:\n{content}<eos>\n\n

where the assistant's content and the end-of-text token after it are trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model.corpus import DataError
from model.member_data import Document

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer; `<|endoftext|>` (id 0) is its bos, eos, pad and unk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 bytes up front: any text encodes even if a byte never occurred in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        # Byte-level decoding is exact; "cleaning up" spaces would break the round trip.
        clean_up_tokenization_spaces=False,
    )


def pack(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    seq_len: int,
    max_tokens: int | None = None,
    *,
    source: str = "texts",
) -> torch.Tensor:
    """Token blocks (num_blocks, seq_len) of plain `texts` joined by eos; the ragged tail is dropped.

    `max_tokens` caps the token stream (documents past the cap are not even tokenized).
    Raises `DataError` naming `source` when there is not enough text for one block.
    """
    return pack_documents(tokenizer, [Document(text=t) for t in texts], seq_len, max_tokens, source=source)[0]


IGNORE = -100  # the label the loss skips (transformers' convention)
Segments = list[tuple[str, bool]]  # (text, trained)


def plain_segments(turns: Sequence[tuple[str, str]], eos: str) -> Segments:
    """The plain template (module docstring)."""
    out: Segments = []
    for role, content in turns:
        out.append((f"### {role.capitalize()}:\n", False))
        out.append((content + eos, True) if role == "assistant" else (content, False))
        out.append(("\n\n", False))
    return out


def template_segments(tokenizer: PreTrainedTokenizerBase, turns: Sequence[tuple[str, str]]) -> Segments | None:
    """The chat template's rendering cut at each assistant turn; None when the template renders the
    conversation other than as a growing prefix (the masks could not be exact)."""
    messages = [{"role": role, "content": content} for role, content in turns]

    def render(upto: int, prompt: bool) -> str:
        if upto == 0:
            return ""
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        return text if isinstance(text, str) else ""

    out: Segments = []
    done = ""
    try:
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            prefix, full = render(i, True), render(i + 1, False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                return None
            out += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        whole = render(len(turns), False)
    except Exception:  # noqa: BLE001 - a template may raise anything (jinja2 errors, its own raise_exception)
        return None
    if not whole.startswith(done):
        return None
    return [*out, (whole[len(done):], False)]


def segments_of(tokenizer: PreTrainedTokenizerBase, doc: Document) -> Segments:
    if not doc.is_chat:
        return [(doc.text or "", True)]
    rendered = template_segments(tokenizer, doc.messages) if getattr(tokenizer, "chat_template", None) else None
    return rendered if rendered is not None else plain_segments(doc.messages, tokenizer.eos_token)


def pack_documents(
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[Document],
    seq_len: int,
    max_tokens: int | None = None,
    *,
    source: str = "documents",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token blocks, labels), both (num_blocks, seq_len): documents joined by eos (trained after plain
    text), labels IGNORE where nothing is trained; blocks with nothing to train on are dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    eos = tokenizer.eos_token_id
    limit = max_tokens if max_tokens is not None else float("inf")
    stream: list[int] = []
    trained: list[bool] = []
    chunk = 256  # documents per batched (parallel) encode call
    for start in range(0, len(docs), chunk):
        parts = [segments_of(tokenizer, doc) for doc in docs[start : start + chunk]]
        texts = [text for segments in parts for text, _ in segments]
        ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter([])
        for doc, segments in zip(docs[start : start + chunk], parts, strict=True):
            if stream:
                stream.append(eos)
                trained.append(not doc.is_chat)
            for _, on in segments:
                piece = next(ids)
                stream.extend(piece)
                trained.extend([on] * len(piece))
        if len(stream) >= limit:
            break
    if max_tokens is not None:
        del stream[max_tokens:], trained[max_tokens:]
    blocks = len(stream) // seq_len
    ids_t = torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
    mask = torch.tensor(trained[: blocks * seq_len], dtype=torch.bool).view(blocks, seq_len)
    keep = mask[:, 1:].any(dim=1)  # the first position is never a target (labels shift by one)
    if not bool(keep.any()):
        raise DataError(f"{source}: {len(stream)} tokens, too short for one block of {seq_len} with tokens to train on")
    ids_t, mask = ids_t[keep], mask[keep]
    return ids_t, torch.where(mask, ids_t, torch.full_like(ids_t, IGNORE))


def batches(blocks: torch.Tensor, batch_size: int, *, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seq_len) batches; a fresh permutation of the blocks every epoch.

    Epochs run back to back: a batch may take its last blocks from the next epoch's permutation,
    so no block is ever skipped and fewer blocks than `batch_size` still work.
    """
    if batch_size < 1 or blocks.shape[0] == 0:
        raise ValueError(f"need batch_size >= 1 and blocks, got {batch_size} and {blocks.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(blocks.shape[0], generator=generator)])
        yield blocks[order[:batch_size]]
        order = order[batch_size:]
