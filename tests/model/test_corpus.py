"""Tests for the demo corpora builder and the member data reader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.corpus import MAX_DOC_CHARS, DataError, build_demo_corpora, groff_to_text
from model.member_data import read_texts

SIZES = dict(bytes_per_domain=200_000, general_bytes=200_000, val_bytes=30_000)


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("corpora")
    return out, build_demo_corpora(out, **SIZES, log=lambda _: None)


def test_builds_at_least_four_domains_with_manifest_matching_files(corpora):
    out, domains = corpora
    assert len(domains) >= 4 and {"code", "legal"} <= set(domains)
    manifest = json.loads((out / "corpora.json").read_text())
    assert sorted(manifest["domains"]) == sorted(domains)
    for d in domains:
        for split, path in [("member", out / "members" / d / "train.jsonl"),
                            ("validation", out / "validation" / f"{d}.jsonl")]:
            docs = _docs(path)
            assert all(docs), "empty documents must be dropped"
            assert manifest["domains"][d][split]["docs"] == len(docs)
            assert manifest["domains"][d][split]["bytes"] == sum(len(t.encode()) for t in docs)
            assert "\n\n\n" not in "".join(docs)
        # Filled to the cap, overshooting by at most one (truncated) document.
        assert 150_000 <= manifest["domains"][d]["member"]["bytes"] < 200_000 + 4 * MAX_DOC_CHARS
    general = _docs(out / "general" / "train.jsonl")
    assert manifest["general"]["docs"] == len(general)
    assert sum(manifest["domains"][d]["general"]["docs"] for d in domains) == len(general)


def test_splits_are_disjoint(corpora):
    out, domains = corpora
    sets = [set(_docs(out / "general" / "train.jsonl"))]
    for d in domains:
        sets += [set(_docs(out / "members" / d / "train.jsonl")),
                 set(_docs(out / "validation" / f"{d}.jsonl"))]
    # No document in two sets: members vs their validation, vs general, vs each other.
    assert sum(len(s) for s in sets) == len(set().union(*sets))


def test_build_is_deterministic_and_seed_dependent(corpora, tmp_path):
    out, domains = corpora
    build_demo_corpora(tmp_path / "again", **SIZES, log=lambda _: None)
    for f in sorted(out.rglob("*.json*")):
        assert (tmp_path / "again" / f.relative_to(out)).read_bytes() == f.read_bytes(), f
    build_demo_corpora(tmp_path / "other", **SIZES, seed=1, log=lambda _: None)
    code = "members/code/train.jsonl"
    assert (tmp_path / "other" / code).read_bytes() != (out / code).read_bytes()


def test_domains_are_non_iid(corpora):
    out, _ = corpora

    def chars(path: Path) -> dict[str, float]:
        counts = Counter("".join(_docs(path)))
        total = sum(counts.values())
        return {c: n / total for c, n in counts.items()}

    def tv(p: dict[str, float], q: dict[str, float]) -> float:  # total variation distance
        return 0.5 * sum(abs(p.get(c, 0) - q.get(c, 0)) for c in set(p) | set(q))

    code = chars(out / "members" / "code" / "train.jsonl")
    across = tv(code, chars(out / "members" / "legal" / "train.jsonl"))
    within = tv(code, chars(out / "validation" / "code.jsonl"))
    assert across > 0.15 and across > 3 * within, (across, within)


def test_man_page_markup_is_stripped():
    page = (".\\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBfiles\\fR\n"
            ".TP\n.BR ls (1)\nsee \\(lqthis\\(rq and \\*(lqthat\\*(rq\\c\n.if n .ne 3\n")
    text = groff_to_text(page)
    assert text.split() == ["NAME", "ls", "-", "list", "files", "ls(1)", "see", '"this"',
                            "and", '"that"']


# ---------------------------------------------------------------------------- read_texts


def test_reads_txt_and_jsonl_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second\r\n\n\n\n\nparagraph  \n")
    (tmp_path / "sub" / "a.jsonl").write_text(
        json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two\u2028x"}) + "\n")
    (tmp_path / "ignored.md").write_text("x")
    assert read_texts(tmp_path) == ["second\n\nparagraph", "one", "two\u2028x"]
    assert read_texts(tmp_path / "b.txt") == ["second\n\nparagraph"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.txt", b"", "file is empty"),
        ("blank.jsonl", b"  \n\n", "file is empty"),
        ("latin1.txt", b"caf\xe9 ok", "invalid UTF-8 at byte offset 3"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
        ("notext.jsonl", b'{"body": "a"}\n', 'line 1 has none of the fields "text"'),
        ("array.jsonl", b'["a"]\n', "line 1: expected an object with fields, got list"),
        ("number.jsonl", b'{"text": "a"}\n{"text": 3}\n', 'line 2: "text" is not a string'),
        ("surrogate.jsonl", b'{"text": "\\ud800"}\n', "not valid Unicode"),
        ("nothing.jsonl", b'{"text": ""}\n{"text": "  "}\n', "yields no text"),
    ],
)
def test_bad_files_raise_one_line_data_error(tmp_path, name, content, expected):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / name).write_bytes(content)
    for target in (tmp_path / name, tmp_path):
        with pytest.raises(DataError) as info:
            read_texts(target)
        message = str(info.value)
        assert "\n" not in message and name in message and expected in message, message


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nope.*no such file"):
        read_texts(tmp_path / "nope")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.md").write_text("a,b")
    with pytest.raises(DataError, match="data: folder has no .txt, .jsonl, .json, .csv, .parquet files"):
        read_texts(tmp_path / "data")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.just(b'{"text": "'), st.just(b'"}'), st.just(b"\n"), st.just(b"\\u"),
                       st.binary(max_size=8), st.text(max_size=8).map(str.encode)),
             max_size=12).map(b"".join),
), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_random_bytes_never_crash(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    try:
        texts = read_texts(path)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert texts and all(isinstance(t, str) and t for t in texts)
