"""Member data formats (model/member_data.py) and the labels of instruction and chat data (model/tokenizer.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.corpus import DataError
from model.member_data import Document, read_documents
from model.tokenizer import IGNORE, pack_documents, segments_of, train_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x + 1\n" * 20,
             "### User:\n### Assistant:\n### System:\n" * 10]
    return train_tokenizer(texts, vocab_size=400)


def test_each_format_reads_its_records(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("Plain notes.\r\nSecond line.\n")
    _jsonl(tmp_path / "a_text.jsonl", [{"text": "one"}, {"text": "  "}, {"text": "two"}])
    _jsonl(tmp_path / "b_alpaca.jsonl", [{"instruction": "Add.", "input": "1 and 2", "output": "3"},
                                         {"instruction": "Greet.", "input": "", "output": "Hello"}])
    _jsonl(tmp_path / "c_pairs.jsonl", [{"instruction": "Name a colour.", "response": "Blue"}])
    (tmp_path / "d_prompt.json").write_text(json.dumps([{"prompt": "2+2=", "completion": "4"}]))
    _jsonl(tmp_path / "e_chat.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello."}]}])
    with (tmp_path / "f_table.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["id", "body"], ["1", "row, with a comma"], ["2", 'a "quoted"\nline']])
    pq.write_table(pa.table({"id": [1, 2], "body": ["first row", "second row"]}), tmp_path / "g_table.parquet")

    docs = read_documents(tmp_path, column="body")
    assert docs == [
        Document(text="one"), Document(text="two"),
        Document(messages=(("user", "Add.\n\n1 and 2"), ("assistant", "3"))),
        Document(messages=(("user", "Greet."), ("assistant", "Hello"))),
        Document(messages=(("user", "Name a colour."), ("assistant", "Blue"))),
        Document(messages=(("user", "2+2="), ("assistant", "4"))),
        Document(messages=(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))),
        Document(text="row, with a comma"), Document(text='a "quoted"\nline'),
        Document(text="first row"), Document(text="second row"),
        Document(text="Plain notes.\nSecond line."),
    ]
    # the folder that was refused whole on main: instruction pairs next to plain notes
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _jsonl(mixed / "pairs.jsonl", [{"instruction": "Summarise the notes.", "response": "They are short."}])
    (mixed / "notes.txt").write_text("Short notes.")
    assert [d.is_chat for d in read_documents(mixed)] == [False, True]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"  \n", "empty.jsonl: file is empty"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "latin1.txt: invalid UTF-8 at byte offset 3"),
    ("cut.jsonl", b'{"text": "ok"}\n{"text": "trunc', "cut.jsonl: line 2 is not valid JSON"),
    ("cut.json", b'[{"text": "ok"},\n {"text": "tr', "cut.json: line 2 is not valid JSON"),
    ("object.json", b'{"text": "ok"}', "object.json: expected a JSON array of records, got dict"),
    ("fields.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'fields.jsonl: line 2 has none of the fields "text"'),
    ("nocol.csv", b"id,body\n1,x\n", 'nocol.csv: line 2 has none of the fields "text"'),
    ("ragged.csv", b"id,text\n1,x\n2\n", "ragged.csv: line 3 does not have the header's 2 fields"),
    ("junk.parquet", b"PAR1 not really", "junk.parquet: not a readable Parquet file"),
    ("role.jsonl", b'{"messages": [{"role": "bot", "content": "x"}]}\n', "role.jsonl: line 1: message 1 has role 'bot'"),
    ("mute.jsonl", b'{"messages": [{"role": "user", "content": "x"}]}\n', "mute.jsonl: line 1: no assistant message"),
    ("empty_answer.jsonl", b'{"prompt": "x", "completion": " "}\n', "empty_answer.jsonl: line 1: the answer is empty"),
    ("notes.md", b"# hi", "notes.md: unsupported file type '.md'"),
])
def test_a_bad_file_is_refused_with_one_line_naming_file_and_line(tmp_path: Path, name: str, content: bytes,
                                                                    message: str) -> None:
    (tmp_path / "good.txt").write_text("fine")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_documents(path)
    assert str(info.value).startswith(f"{path.parent}/{message}"), str(info.value)
    assert "\n" not in str(info.value)
    if name != "notes.md":  # a folder with one bad file among good ones is refused whole (module docstring)
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            read_documents(tmp_path)


def _trained(tokenizer, blocks: torch.Tensor, labels: torch.Tensor) -> str:  # noqa: ANN001
    ids = blocks[:, 1:][labels[:, 1:] != IGNORE]  # what the loss sees (labels shift by one)
    return tokenizer.decode(ids.tolist())


def _stream(blocks: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]]:
    return blocks.flatten().tolist(), labels.flatten().tolist()


def test_instruction_pairs_train_on_the_answer_and_its_end_only(tokenizer) -> None:  # noqa: ANN001
    doc = Document(messages=(("user", "Say the fox line."), ("assistant", "The quick brown fox.")))
    blocks, labels = pack_documents(tokenizer, [doc] * 12, seq_len=64)
    ids, targets = _stream(blocks, labels)
    assert all(t in (IGNORE, i) for i, t in zip(ids, targets, strict=True))
    trained = _trained(tokenizer, blocks, labels)
    assert "Say the fox" not in trained and "### User" not in trained and "### Assistant" not in trained
    # every answer whole, but where a block boundary cuts one (at most one per block)
    assert trained.count("The quick brown fox.<|endoftext|>") >= 12 - 2 * blocks.shape[0]
    assert blocks.shape[0] >= 3


def test_plain_text_is_trained_on_every_token(tokenizer) -> None:  # noqa: ANN001
    blocks, labels = pack_documents(tokenizer, [Document(text="The lazy dog. " * 8)] * 3, seq_len=8)
    assert torch.equal(blocks, labels)


def test_chat_uses_the_tokenizers_template_and_trains_every_assistant_turn(tokenizer) -> None:  # noqa: ANN001
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                    additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    doc = Document(messages=(("system", "Be brief."), ("user", "Fox?"), ("assistant", "Quick brown."),
                             ("user", "Dog?"), ("assistant", "Lazy.")))
    assert segments_of(tokenizer, doc) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFox?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Quick brown.<|im_end|>\n", True),
        ("<|im_start|>user\nDog?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Lazy.<|im_end|>\n", True),
        ("", False),
    ]
    blocks, labels = pack_documents(tokenizer, [doc] * 3, seq_len=64)
    assert tokenizer.decode(blocks.flatten().tolist()).startswith("<|im_start|>system\nBe brief.")
    trained = _trained(tokenizer, blocks, labels)
    assert "Quick brown.<|im_end|>\nLazy.<|im_end|>\n" in trained
    assert "Fox?" not in trained and "Dog?" not in trained and "Be brief" not in trained


def test_a_template_that_is_not_a_growing_prefix_falls_back_to_the_plain_template(tokenizer) -> None:  # noqa: ANN001
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    tokenizer.chat_template = "{{ messages | length }} turns: {% for m in messages %}{{ m['content'] }} {% endfor %}"
    doc = Document(messages=(("user", "Fox?"), ("assistant", "Quick brown fox.")))
    blocks, labels = pack_documents(tokenizer, [doc] * 4, seq_len=32)
    assert "### User:\nFox?" in tokenizer.decode(blocks.flatten().tolist())
    assert "turns:" not in tokenizer.decode(blocks.flatten().tolist())
    assert "Quick brown fox.<|endoftext|>" in _trained(tokenizer, blocks, labels)


def test_blocks_holding_only_prompt_tokens_are_dropped(tokenizer) -> None:  # noqa: ANN001
    doc = Document(messages=(("user", "The quick brown fox jumps over the lazy dog. " * 6), ("assistant", "Dog.")))
    blocks, labels = pack_documents(tokenizer, [doc] * 3, seq_len=8)
    assert bool((labels[:, 1:] != IGNORE).any(dim=1).all())
    per_doc = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text, _ in segments_of(tokenizer, doc))
    assert blocks.shape[0] <= 6 < (3 * per_doc + 2) // 8  # most blocks held prompt tokens only
    with pytest.raises(DataError, match="too short for one block of 512 with tokens to train on"):
        pack_documents(tokenizer, [doc], seq_len=512)
