"""The data quality pipeline (model/quality.py): planted duplicates, boilerplate and random bytes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from model.member_data import Document, read_documents
from model.quality import QualityReport, clean, curriculum_levels, grade, junk_reason
from server.workspace import Workspace


def _plant(folder: Path, good: list[str]) -> dict[str, str]:
    """Junk written into `folder` next to the good documents: file name -> the reason expected."""
    rng = random.Random(7)
    words = good[3].split()
    noisy = " ".join(w if rng.random() > 0.01 and i != 10 else w.upper() + "x" for i, w in enumerate(words))  # ~1% touched
    junk = {
        "copy.txt": (good[1], "exact duplicate"),
        "copy_spaced.txt": ("  " + good[2].replace(" ", "  ").upper(), "exact duplicate"),
        "copy_noisy.txt": (noisy, "near duplicate"),
        "random.txt": ("".join(chr(rng.randrange(0x21, 0x2FF)) for _ in range(3000)), "random bytes"),
        "base64.txt": ("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                               for _ in range(4000)), "random bytes"),
        "banner.txt": ("\n".join(["# AUTO-GENERATED FILE, DO NOT EDIT"] * 12 + ["x = 1", "y = 2"]), "repeated lines"),
        "spam.txt": ("buy cheap pills now " * 40, "repetition"),
        "stub.txt": ("TODO: write", "too short"),
        "box.txt": ("═══ ║ ╔╗ ╚╝ ═══ ║ ║ ╔═╗ ║ ╚═╝ " * 30 + " a b c d e f", "symbols"),
    }
    for name, (text, _) in junk.items():
        (folder / name).write_text(text)
    boiler = "Copyright (c) the authors. All rights reserved. Redistribution permitted under the terms above."
    for i in range(5):  # the same boilerplate in five files: one is kept, four are exact duplicates
        (folder / f"notice_{i}.txt").write_text(boiler)
    return {name: reason for name, (_, reason) in junk.items()}


@pytest.fixture()
def folder(tiny_workspace: Workspace, tmp_path: Path) -> tuple[Path, list[str]]:
    texts = [json.loads(line)["text"] for line in (tiny_workspace.members_dir / "legal" / "train.jsonl").read_text().splitlines()]
    good = [t for t in texts if len(t.split()) > 40 and junk_reason(t) is None][:40]  # copies are made of these
    out = tmp_path / "member"
    out.mkdir()
    (out / "a_good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good))
    return out, good


def test_planted_duplicates_boilerplate_and_random_bytes_are_dropped_and_reported(folder) -> None:  # noqa: ANN001
    out, good = folder
    alone = clean(read_documents(out / "a_good.jsonl"))  # the good documents' own near-copies (licence texts) go too
    expected = _plant(out, good)
    report = QualityReport()
    kept = clean(read_documents(out), report)
    boiler = [d for d in kept if d.source.endswith("notice_0.txt")]
    assert kept == alone + boiler  # every good document the pipeline keeps alone, one notice, no junk
    for name, reason in expected.items():
        assert report.files[str(out / name)] == {"read": 1, "kept": 0, reason: 1}, name
    for i in range(1, 5):
        assert report.files[str(out / f"notice_{i}.txt")] == {"read": 1, "kept": 0, "exact duplicate": 1}
    assert report.files[str(out / "a_good.jsonl")]["kept"] == len(alone)
    assert report.dropped() == len(expected) + 4 + len(good) - len(alone)
    assert any(line.startswith(f"{out / 'random.txt'}: kept 0 of 1 (dropped 1 random bytes)") for line in report.lines())
    # deterministic: the same folder gives the same documents and the same report
    again = QualityReport()
    assert clean(read_documents(out), again) == kept and again.files == report.files


def test_real_text_and_code_pass_the_filters(tiny_workspace: Workspace) -> None:
    for domain in ("code", "legal", "manuals"):
        texts = [json.loads(line)["text"] for line in
                 (tiny_workspace.members_dir / domain / "train.jsonl").read_text().splitlines()[:200]]
        texts = [t for t in texts if len(t.split()) >= 50]
        dropped = [junk_reason(t) for t in texts if junk_reason(t) is not None]
        assert len(dropped) <= 0.1 * len(texts), (domain, dropped[:5])


def test_chat_documents_are_judged_on_their_content() -> None:
    chat = Document(messages=(("user", "Explain the licence."), ("assistant", "It allows copying with attribution, " * 1 + "nothing more.")))
    assert clean([chat, chat]) == [chat]


def test_difficulty_levels_and_the_curriculum() -> None:
    assert grade([3.0, 1.0, 2.0, 5.0, 4.0, 0.5], 3) == [1, 0, 1, 2, 2, 0]
    assert grade([1.0, 1.0, 1.0], 2) == [0, 0, 1]  # ties by position
    assert [curriculum_levels(r, 3, 2) for r in range(1, 9)] == [1, 1, 2, 2, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="levels"):
        grade([1.0], 0)
