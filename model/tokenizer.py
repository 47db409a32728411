"""Byte-level BPE tokenizer training, and packing of documents into fixed-length token blocks.

Byte-level BPE (GPT-2 style) encodes any Unicode text without an unknown token, so member data
never loses characters. Packing joins documents with `<|endoftext|>` and cuts the stream into
(num_blocks, seq_len) blocks: no padding, every token is trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model.corpus import DataError

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
    """Token blocks (num_blocks, seq_len) of `texts` joined by eos; the ragged tail is dropped.

    `max_tokens` caps the token stream (documents past the cap are not even tokenized).
    Raises `DataError` naming `source` when there is not enough text for one block.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    eos = tokenizer.eos_token_id
    limit = max_tokens if max_tokens is not None else float("inf")
    stream: list[int] = []
    chunk = 256  # documents per batched (parallel) encode call
    for start in range(0, len(texts), chunk):
        ids = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False)["input_ids"]
        for doc in ids:
            if stream:
                stream.append(eos)
            stream.extend(doc)
        if len(stream) >= limit:
            break
    if max_tokens is not None:
        del stream[max_tokens:]
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise DataError(f"{source}: {len(stream)} tokens, too short for one block of {seq_len}")
    return torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


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
