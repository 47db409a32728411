"""Tests for byte-level BPE training, token packing and batching."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from model.corpus import DataError
from model.tokenizer import EOT, batches, pack, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Unicode: café, naïve, 日本語, emoji 🎉, tabs\tand  double  spaces\n\n",
] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_vocab_special_token_and_determinism(tok):
    assert len(tok) <= 400 and len(tok) > 256
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == EOT
    assert tok.convert_tokens_to_ids(EOT) == tok.eos_token_id
    again = train_tokenizer(TEXTS, vocab_size=400)
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


UNSEEN = "  leading spaces, never seen: Ωμέγα ∑ 🦀\r\n"


@pytest.mark.parametrize("text", [TEXTS[3], UNSEEN, ""])
def test_encode_decode_round_trip_is_exact(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.eos_token_id not in ids
    assert tok.decode(ids) == text


def test_save_and_autotokenizer_load_give_same_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:4] + ["unseen words: zyzzyva 🦀"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token == EOT


def test_pack_joins_documents_with_eos_and_drops_tail(tok):
    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    ids = [tok.encode(d, add_special_tokens=False) for d in docs]
    stream = ids[0] + [tok.eos_token_id] + ids[1] + [tok.eos_token_id] + ids[2]
    blocks = pack(tok, docs, seq_len=3)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 3, 3)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert blocks.flatten().tolist().count(tok.eos_token_id) == 2


def test_pack_max_tokens_caps_the_stream(tok):
    blocks = pack(tok, TEXTS, seq_len=16)
    capped = pack(tok, TEXTS, seq_len=16, max_tokens=70)
    assert capped.shape == (4, 16)
    assert torch.equal(capped, blocks[:4])


def test_pack_too_little_text_raises_data_error(tok):
    with pytest.raises(DataError, match="acme/train.jsonl: .* too short for one block of 512"):
        pack(tok, ["tiny"], seq_len=512, source="acme/train.jsonl")
    with pytest.raises(DataError):
        pack(tok, [], seq_len=4)


def test_batches_deterministic_and_cover_every_block_each_epoch():
    blocks = torch.arange(12 * 5).view(12, 5)
    first = [b for b, _ in zip(batches(blocks, 4, seed=7), range(9))]
    second = [b for b, _ in zip(batches(blocks, 4, seed=7), range(9))]
    other = [b for b, _ in zip(batches(blocks, 4, seed=8), range(9))]
    assert all(b.shape == (4, 5) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    rows = [r[0].item() // 5 for b in first for r in b]
    for epoch in range(3):  # 12 blocks / 4 per batch = 3 batches per epoch
        assert sorted(rows[epoch * 12 : (epoch + 1) * 12]) == list(range(12))
    assert rows[:12] != rows[12:24], "reshuffled each epoch"


def test_batches_with_fewer_blocks_than_batch_size():
    blocks = torch.arange(3 * 2).view(3, 2)
    batch = next(batches(blocks, 5, seed=0))
    assert batch.shape == (5, 2)
    assert set(batch[:3, 0].tolist()) == {0, 2, 4}
