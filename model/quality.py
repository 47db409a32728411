"""A member's data quality pipeline, node-local, before training: duplicates, heuristic filters,
difficulty levels for a curriculum.

1. Exact duplicates (the same normalised text) and near duplicates (MinHash over word 5-grams,
   datasketch's LSH at Jaccard >= 0.8) are dropped; the first copy in path order is kept.
2. Heuristic filters in the spirit of Gopher/C4 (Rae et al. 2021, Raffel et al. 2020): too few
   words, random bytes (character entropy over 6 bits, or most characters in 'words' over 25
   characters long: base64, hex dumps), too many
   symbols, and repetition (a large share of repeated lines, or of the text inside word 5-grams
   that occur more than once).
3. Difficulty: the frozen base's mean token loss per document, cut into `levels` equal-count
   levels (0: easiest). The curriculum (`curriculum_levels`) opens one level more every
   `rounds_per_level` rounds, easy to hard.

Every decision is a pure function of the documents and their order, so two runs over the same
folder keep the same documents. The report says per file what was dropped and why. The filters
are hand-written: they are a few lines each, and the libraries that ship them (datatrove,
dolma) bring whole processing frameworks with them.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from model.member_data import Document

MIN_WORDS = 5
ROUNDS_PER_LEVEL = 2  # the curriculum opens one more difficulty level every this many rounds
NEAR_DUPLICATE = 0.8  # Jaccard similarity of word 5-gram sets
NUM_PERM = 128
MAX_ENTROPY_BITS = 6.0  # natural text and code stay near 4-5 bits per character
MAX_LONG_WORD_SHARE = 0.3  # characters in "words" over 25 characters (base64, hex dumps)
MAX_SYMBOL_RATIO = 0.3  # characters neither letters, digits, whitespace nor ASCII punctuation
MAX_REPEATED_LINES = 0.5  # share of non-blank lines that repeat an earlier line (Gopher: 0.3)
MAX_DUPLICATE_5GRAMS = 0.7  # share of characters in word 5-grams seen more than once (Gopher: 0.15; code and licences repeat more)
_WORD = re.compile(r"\w+", re.UNICODE)
_ASCII_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclass
class QualityReport:
    """Per file: documents read, kept, and dropped per reason."""

    files: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, source: str, what: str) -> None:
        per = self.files.setdefault(source, {"read": 0, "kept": 0})
        per[what] = per.get(what, 0) + 1

    def dropped(self) -> int:
        return sum(n for per in self.files.values() for k, n in per.items() if k not in ("read", "kept"))

    def lines(self) -> list[str]:
        out = []
        for source, per in sorted(self.files.items()):
            reasons = ", ".join(f"{n} {k}" for k, n in sorted(per.items()) if k not in ("read", "kept"))
            out.append(f"{source}: kept {per['kept']} of {per['read']}" + (f" (dropped {reasons})" if reasons else ""))
        return out


def junk_reason(text: str) -> str | None:
    """Why a document is junk by the heuristic filters (None: it passes)."""
    words = _WORD.findall(text)
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "too short"
    counts = Counter(chars)
    entropy = -sum(n / len(chars) * math.log2(n / len(chars)) for n in counts.values())
    long_words = sum(len(w) for w in words if len(w) > 25)
    if entropy > MAX_ENTROPY_BITS or long_words / len(chars) > MAX_LONG_WORD_SHARE:
        return "random bytes"
    if len(words) < MIN_WORDS:
        return "too short"
    symbols = sum(n for c, n in counts.items() if not c.isalnum() and c not in _ASCII_PUNCT)
    if symbols / len(chars) > MAX_SYMBOL_RATIO:
        return "symbols"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) >= 5 and 1 - len(set(lines)) / len(lines) > MAX_REPEATED_LINES:
        return "repeated lines"
    if len(words) >= 30 and _duplicate_ngram_share(words, 5) > MAX_DUPLICATE_5GRAMS:
        return "repetition"
    return None


def _duplicate_ngram_share(words: list[str], n: int) -> float:
    """Share of the words' characters inside word n-grams that occur more than once (Gopher's rule)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / max(sum(map(len, words)), 1)


def _minhash(text: str):  # noqa: ANN202 - datasketch.MinHash
    from datasketch import MinHash

    words = [w.lower() for w in _WORD.findall(text)]
    shingles = {" ".join(words[i : i + 5]).encode() for i in range(max(len(words) - 4, 1))}
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch(sorted(shingles))
    return m


def clean(docs: Sequence[Document], report: QualityReport | None = None) -> list[Document]:
    """The documents that pass: duplicates and junk dropped, in their order; `report` counts why."""
    from datasketch import MinHashLSH

    report = report if report is not None else QualityReport()
    seen: set[str] = set()
    lsh = MinHashLSH(threshold=NEAR_DUPLICATE, num_perm=NUM_PERM)
    kept = []
    for number, doc in enumerate(docs):
        text = doc.content
        report.count(doc.source, "read")
        digest = hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()
        reason = "exact duplicate" if digest in seen else junk_reason(text)
        if reason is None:
            signature = _minhash(text)
            if lsh.query(signature):
                reason = "near duplicate"
            else:
                lsh.insert(str(number), signature)
        seen.add(digest)
        report.count(doc.source, reason or "kept")
        if reason is None:
            kept.append(doc)
    return kept


def grade(losses: Sequence[float], levels: int) -> list[int]:
    """Each document's level from its base loss: `levels` groups of equal count, 0 the easiest
    (ties broken by position, so the grading is deterministic)."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    order = sorted(range(len(losses)), key=lambda i: (losses[i], i))
    level = [0] * len(losses)
    for rank, i in enumerate(order):
        level[i] = rank * levels // max(len(losses), 1)
    return level


def curriculum_levels(rnd: int, levels: int, rounds_per_level: int) -> int:
    """How many levels (easiest first) round `rnd` (1-based) trains on."""
    return min(levels, 1 + max(rnd - 1, 0) // max(rounds_per_level, 1))


def by_level(docs: Sequence[Document], loss_of: Callable[[Sequence[Document]], list[float]], levels: int) -> list[list[Document]]:
    """The documents split into difficulty levels by the base's loss on them."""
    graded = grade(loss_of(docs), levels)
    return [[d for d, g in zip(docs, graded, strict=True) if g == level] for level in range(levels)]
