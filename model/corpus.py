"""Text corpora: builds the non-IID demo corpora from local system text, and reads member data.

The demo needs several organisations whose data differ in kind, without downloading anything.
Every Debian + Python machine carries such text: the Python standard library (code), package
copyright files (legal), man pages (manuals), Debian changelogs and package READMEs. Each domain
becomes one member's private data; disjoint files of every domain form the operator's general
pre-training mixture and held-out validation sets.

Member data is read by model/member_data.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("member", "validation", "general")
# One enormous file (glibc's changelog, a 400 KB stdlib module) would otherwise fill a domain's
# whole budget and make it one document; cut at a paragraph boundary instead.
MAX_DOC_CHARS = 40_000


class DataError(ValueError):
    """Unusable text data; the message is one line and starts with the offending file."""


# ---------------------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # keeps \t and \n
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise newlines, drop control characters and trailing spaces, collapse blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _truncate(text: str) -> str:
    if len(text) <= MAX_DOC_CHARS:
        return text
    cut = text.rfind("\n\n", 0, MAX_DOC_CHARS)
    return text[: cut if cut > 0 else MAX_DOC_CHARS].rstrip()


# ---------------------------------------------------------------------------- groff -> text

# Named glyphs worth keeping; every other escape is dropped.
_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "bu": "•", "lq": '"', "rq": '"', "dq": '"',
    "oq": "'", "cq": "'", "aq": "'", "co": "©", "rg": "®", "tm": "™", "mu": "×", "ti": "~",
    "ha": "^", "ga": "`", "aa": "'", "ba": "|", "bv": "|", "rs": "\\", "Tm": "™", "R": "®",
    "<=": "≤", ">=": "≥", "->": "→", "<-": "←", "de": "°", "+-": "±", "sl": "/",
}
_ARG = r"(?:\[([^\]]*)\]|\((..)|(.))"  # \X[name], \X(xx or \Xx
_ESCAPE = re.compile(
    r"\\(?:"
    r"\"[^\n]*"  # comment to end of line
    rf"|[fFnmgkYV*]{_ARG}"  # fonts, registers, colours, strings
    r"|s(?:[+-]?\d{1,2}|\([+-]?\d\d|\[[^\]]*\]|'[^']*')"  # point size
    r"|[hvwlLoxXbDZNRSAB]'[^']*'"  # motions, widths, drawing
    r"|\(([^\n]{2})|\[([^\]\n]*)\]"  # glyphs
    r"|([\s\S]))"  # one-character escapes
)
_SIMPLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", ".": ".",
           "'": "'", "`": "`"}
# Macros that only start a paragraph; their arguments (indents) are not text.
_BREAKS = {"PP", "LP", "P", "TP", "HP", "RS", "RE", "Pp", "Bl", "El", "Bd", "Ed", "br", "sp",
           "in", "nf", "fi", "TQ", "IX", "EX", "EE"}
# Alternating-font macros print their arguments without spaces between them.
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
# mdoc (BSD) callable macros that appear inside argument lists.
_MDOC = {"Fl", "Ar", "Op", "Oo", "Oc", "Nm", "Pa", "Xr", "Cm", "Ic", "Ev", "Va", "Dv", "Er",
         "Li", "Em", "Sy", "Dq", "Qq", "Sq", "Ql", "Ns", "Pq", "It", "Ek", "Bk", "No", "Fn",
         "Ft", "Fa", "Vt", "Ta", "Aq", "Brq", "Xo", "Xc"}
_ARGS = re.compile(r'"((?:[^"]|"")*)"|(\S+)')


def _unescape(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        glyph = m.group(4) or m.group(5)
        if glyph is not None:
            return _GLYPHS.get(glyph, "")
        if m.group(0)[1] == "*":  # predefined strings \*(lq, \*R
            return _GLYPHS.get(m.group(1) or m.group(2) or m.group(3) or "", "")
        one = m.group(6)
        if one is not None:
            return _SIMPLE.get(one, "")
        return ""

    return _ESCAPE.sub(sub, text)


def groff_to_text(source: str) -> str:
    """Plain text of a man page: requests dropped, macro arguments kept, escapes resolved."""
    out: list[str] = []
    for line in source.split("\n"):
        if not line.startswith((".", "'")):
            out.append(_unescape(line))
            continue
        name, _, rest = line[1:].strip().partition(" ")
        if name in _BREAKS or name in {"SH", "SS", "Sh", "Ss"}:
            out.append("")
        if name in _BREAKS or not name[:1].isupper():
            # Lower-case names are roff requests (.de, .if, .nr, ...): layout, not text.
            continue
        if name in {"TH", "Dd", "Dt", "Os", "UC", "so"}:
            continue
        args = [q.replace('""', '"') if q or not w else w for q, w in _ARGS.findall(rest)]
        args = [a for a in args if a not in _MDOC]
        if name == "IP":  # .IP tag indent: the indent is layout
            out.append("")
            args = args[:1]
        joined = ("" if name in _ALTERNATING else " ").join(args)
        if joined:
            out.append(_unescape(joined))
    return "\n".join(out)


# ---------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One demo domain: where its files are and how a file becomes a document."""

    domain: str
    description: str
    list_files: Callable[[], list[Path]]
    to_text: Callable[[bytes], str]


def _glob(patterns: Iterable[str], root: str = "/") -> list[Path]:
    found = {p for pattern in patterns for p in Path(root).glob(pattern)}
    return sorted(p for p in found if p.is_file())


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Test suites are repetitive fixtures and encodings/ is hex tables: neither reads like code.
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings",
            "__pycache__"}
    return [p for p in _glob(["**/*.py"], str(root)) if skip.isdisjoint(p.relative_to(root).parts)]


def _decode(data: bytes) -> str:
    return data.decode("utf-8")  # strict: a file that is not UTF-8 is skipped, not mangled


def _gunzip(data: bytes) -> str:
    return gzip.decompress(data).decode("utf-8")


def _man_page(data: bytes) -> str:
    source = _gunzip(data)
    if source.lstrip().startswith(".so "):  # a redirect to another page
        return ""
    return groff_to_text(source)


def _doc_file(data: bytes) -> str:
    return _gunzip(data) if data[:2] == b"\x1f\x8b" else _decode(data)


SOURCES = (
    Source("code", "Python standard library (*.py, without tests)", _stdlib_files, _decode),
    Source("legal", "/usr/share/doc/*/copyright, /usr/share/common-licenses/*",
           lambda: _glob(["usr/share/doc/*/copyright", "usr/share/common-licenses/*"]), _decode),
    Source("manuals", "English man pages /usr/share/man/man[1-8]/*.gz (groff stripped)",
           lambda: _glob(["usr/share/man/man[1-8]/*.gz"]), _man_page),
    Source("changelogs", "Debian package changelogs /usr/share/doc/*/changelog.Debian.gz",
           lambda: _glob(["usr/share/doc/*/changelog.Debian.gz"]), _gunzip),
    Source("readmes", "package READMEs and Markdown docs in /usr/share/doc",
           lambda: _glob(["usr/share/doc/*/README*", "usr/share/doc/*/*.md",
                          "usr/share/doc/*/*.md.gz"]), _doc_file),
)


# ---------------------------------------------------------------------------- builder


def _stable_unit(key: str) -> tuple[int, float]:
    """(ordering key, uniform number in [0, 1)) from sha256: identical on every machine and run."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big") / 2**64


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonl(texts: Iterable[str]) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


def build_demo_corpora(
    out_dir: Path,
    *,
    bytes_per_domain: int = 1_500_000,
    general_bytes: int = 1_500_000,
    val_bytes: int = 120_000,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Build member, validation and general corpora under `out_dir`; return the domains built.

    Each domain's files are visited in the order of a stable hash of (seed, path); the same hash
    assigns each file to exactly one split, with odds proportional to the split's byte budget so
    the three fill up together. Reading stops when all three are full, so only a few hundred
    files are opened. Identical documents (shared licence texts) are kept once, in the first
    split that takes them, so no text appears in two splits.
    """
    out_dir = Path(out_dir)
    available = []
    for source in SOURCES:
        files = source.list_files()
        if files:
            available.append((source, files))
        else:
            log(f"note: no files for domain '{source.domain}' ({source.description}); skipping it")
    if len(available) < 2:
        raise DataError(f"{out_dir}: only {len(available)} demo domain(s) found on this machine; "
                        "need at least 2")

    general_share = general_bytes // len(available)
    budget = {"member": bytes_per_domain, "validation": val_bytes, "general": general_share}
    total = sum(budget.values())
    seen: set[bytes] = set()
    general: list[tuple[int, str]] = []
    summary: dict[str, dict[str, object]] = {}
    built = []
    for source, files in available:
        docs: dict[str, list[str]] = {s: [] for s in SPLITS}
        size = dict.fromkeys(SPLITS, 0)
        for key, u, path in sorted((*_stable_unit(f"{seed}:{p}"), p) for p in files):
            cut = u * total
            split = ("member" if cut < budget["member"]
                     else "validation" if cut < budget["member"] + budget["validation"]
                     else "general")
            if size[split] >= budget[split]:
                if all(size[s] >= budget[s] for s in SPLITS):
                    break
                continue
            try:
                text = _truncate(clean_text(source.to_text(path.read_bytes())))
            except (OSError, ValueError, EOFError):  # unreadable, not gzip, or not UTF-8
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if not text or digest in seen:
                continue
            seen.add(digest)
            docs[split].append(text)
            size[split] += len(text.encode())
            if split == "general":
                general.append((key, text))
        if not docs["member"] or not docs["validation"]:
            log(f"note: domain '{source.domain}' yielded too little text; skipping it")
            continue
        _write_atomic(out_dir / "members" / source.domain / "train.jsonl", _jsonl(docs["member"]))
        _write_atomic(out_dir / "validation" / f"{source.domain}.jsonl", _jsonl(docs["validation"]))
        summary[source.domain] = {
            "source": source.description,
            "files_available": len(files),
            **{s: {"docs": len(docs[s]), "bytes": size[s]} for s in SPLITS},
        }
        built.append(source.domain)
        log(f"{source.domain}: member {size['member']:,} B, validation {size['validation']:,} B, "
            f"general {size['general']:,} B")
    if len(built) < 2:
        raise DataError(f"{out_dir}: only {len(built)} demo domain(s) could be built; need 2")
    # Interleave domains in the general mixture by the same stable key (never by domain order).
    general_texts = [t for _, t in sorted(general)]
    _write_atomic(out_dir / "general" / "train.jsonl", _jsonl(general_texts))
    manifest = {
        "seed": seed,
        "max_doc_chars": MAX_DOC_CHARS,
        "domains": summary,
        "general": {"docs": len(general_texts),
                    "bytes": sum(len(t.encode()) for t in general_texts)},
    }
    _write_atomic(out_dir / "corpora.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return built
