"""`fedmoe ledger ...` and `fedmoe rights`: show, verify, export and prove the operator's
transparency ledger, and print what each member's contribution entitles it to.

    fedmoe ledger show                      records and the latest signed tree head
    fedmoe ledger verify                    recompute everything; exit 1 naming the first bad record
    fedmoe ledger export --format csv       records as CSV (or JSON with the heads)
    fedmoe ledger public-key --out op.pem   the operator's public key, for members
    fedmoe ledger prove --member acme       acme's inclusion (+ consistency) proof as JSON
    fedmoe ledger verify-proof --proof p.json --public-key op.pem   a member's offline check
    fedmoe rights --policy policy.toml      each member's entitlement in words
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.ledger import (
    Ledger,
    LedgerError,
    MemberProof,
    OperatorKey,
    Record,
    SignedTreeHead,
    load_public_key,
    verify,
    verify_member_proof,
)
from server.rights import PolicyError, entitlements, load_policy, statement

DEFAULT_LEDGER = Path(".fedmoe/demo/runs/demo/ledger.sqlite")
DEFAULT_KEY = Path(".fedmoe/demo/operator/operator_ed25519.pem")
DEFAULT_POLICY = Path(".fedmoe/demo/operator/policy.toml")

ledger_app = typer.Typer(
    help="The operator's transparency ledger: show, verify, export, prove.", no_args_is_help=True
)
console = Console(soft_wrap=True)

Ledger_ = Annotated[Path, typer.Option("--ledger", help="The ledger file (SQLite).")]
Key_ = Annotated[
    Path, typer.Option("--operator-key", help="The operator's Ed25519 private key (PEM).")
]


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=1)


def _open(path: Path) -> Ledger:
    try:
        return Ledger(path, create=False)
    except LedgerError as exc:
        raise _fail(str(exc)) from None


def _public_key_pem(public_key: Path | None, operator_key: Path) -> bytes:
    """The PEM given with --public-key, else the public half of the operator's own key."""
    try:
        if public_key is not None:
            if not public_key.is_file():
                raise LedgerError(f"{public_key}: no public key file")
            pem = public_key.read_bytes()
            load_public_key(pem, str(public_key))
            return pem
        return OperatorKey.load(operator_key).public_key_pem()
    except LedgerError as exc:
        raise _fail(str(exc)) from None


def _human(n: int, unit: str) -> str:
    """1234567 -> '1.2M' (bytes: '1.2MB')."""
    for scale, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n}{unit}"


def _write(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=not text.endswith("\n"))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        console.print(f"wrote {escape(str(out))}")


@ledger_app.command()
def show(ledger: Ledger_ = DEFAULT_LEDGER) -> None:
    """Print the records and the latest signed tree head."""
    with _open(ledger) as book:
        try:
            records, head = book.records(), book.latest_head()
        except LedgerError as exc:
            raise _fail(str(exc)) from None
    table = Table(title=f"ledger {escape(str(ledger))}")
    kinds = any(r.kind != "contribution" for r in records)
    for column in ("#", "round", "member", *(["kind"] if kinds else []), "score", "share", "tokens", "up", "down",
                   "dp ε", "release"):  # fmt: skip
        left = column in ("member", "kind", "release")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for index, r in enumerate(records):
        table.add_row(
            str(index), str(r.round), escape(r.member), *([escape(r.kind)] if kinds else []), f"{r.score:+.4g}",
            f"{r.share:.1%}", _human(r.tokens, ""), _human(r.bytes_up, "B"), _human(r.bytes_down, "B"),
            "-" if r.dp_epsilon is None else f"{r.dp_epsilon:.3g}", r.release_sha256[:8],
        )  # fmt: skip
    if records:
        table.caption = f"records written {records[0].time} … {records[-1].time}"
    console.print(table)
    if head is None:
        console.print("no signed tree head yet (empty ledger)")
    else:
        console.print(
            f"latest signed tree head: size {head.size}, root {head.root}, time {head.time}, key {head.key_id[:16]}…"
        )


@ledger_app.command("verify")
def verify_command(
    ledger: Ledger_ = DEFAULT_LEDGER,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key", help="Operator public key PEM (default: from --operator-key)."
        ),
    ] = None,
    operator_key: Key_ = DEFAULT_KEY,
) -> None:
    """Recompute every signature and Merkle root; exit 1 naming the first bad record or head."""
    report = verify(ledger, _public_key_pem(public_key, operator_key))
    if not report.ok:
        raise _fail(report.problem or "verification failed")
    console.print(
        f"ledger {escape(str(ledger))}: OK ({report.records} records, {report.heads} signed tree heads)"
    )


@ledger_app.command()
def export(
    ledger: Ledger_ = DEFAULT_LEDGER,
    format: Annotated[
        str, typer.Option("--format", help="csv (records) or json (records and heads).")
    ] = "csv",
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
) -> None:
    """Export the records (CSV) or the records and signed tree heads (JSON)."""
    if format not in ("csv", "json"):
        raise _fail(f"--format {format!r}: expected csv or json")
    with _open(ledger) as book:
        try:
            records, heads = book.records(), book.heads()
        except LedgerError as exc:
            raise _fail(str(exc)) from None
    if format == "json":
        text = json.dumps(
            {
                "records": [{"index": i, **asdict(r)} for i, r in enumerate(records)],
                "heads": [h.to_json() for h in heads],
            },
            indent=2,
            sort_keys=True,
        )
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = [f.name for f in fields(Record)]
        writer.writerow(["index", *names])
        for i, r in enumerate(records):
            writer.writerow([i, *(_cell(getattr(r, n)) for n in names)])
        text = buffer.getvalue()
    _write(text, out)


def _cell(value: object) -> object:
    """CSV cell: floats as repr (round-trippable, like the canonical record), None empty."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


@ledger_app.command("public-key")
def public_key_command(
    operator_key: Key_ = DEFAULT_KEY,
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
) -> None:
    """Print the operator's public key (PEM), which members use to check proofs."""
    try:
        pem = OperatorKey.load(operator_key).public_key_pem()
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    _write(pem.decode("ascii"), out)


def _read_head(path: Path) -> SignedTreeHead:
    """A signed tree head from a JSON file: a head itself, or a member proof (its head)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LedgerError(f"{path}: no such file") from None
    except ValueError as exc:
        raise LedgerError(f"{path}: not JSON ({str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict) and "format" in obj and "head" in obj:
        obj = obj["head"]
    try:
        return SignedTreeHead.from_json(obj)
    except LedgerError as exc:
        raise LedgerError(f"{path}: {exc}") from None


@ledger_app.command()
def prove(
    member: Annotated[str, typer.Option("--member", help="The member whose records to prove.")],
    ledger: Ledger_ = DEFAULT_LEDGER,
    since_head: Annotated[
        Path | None,
        typer.Option(
            "--since-head", help="A tree head (or earlier proof) JSON to prove consistency from."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the proof here instead of stdout.")
    ] = None,
) -> None:
    """Inclusion proofs of a member's records under the latest head (+ consistency since a head)."""
    try:
        since = None if since_head is None else _read_head(since_head)
        with _open(ledger) as book:
            proof = book.prove(member, since)
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    _write(proof.to_json(), out)


@ledger_app.command("verify-proof")
def verify_proof_command(
    proof: Annotated[
        Path, typer.Option("--proof", help="The proof JSON from `fedmoe ledger prove`.")
    ],
    public_key: Annotated[
        Path, typer.Option("--public-key", help="The operator's public key PEM.")
    ],
) -> None:
    """A member's offline check of its proof: signatures, inclusion, consistency."""
    if not proof.is_file():
        raise _fail(f"{proof}: no such file")
    pem = _public_key_pem(public_key, DEFAULT_KEY)
    text = proof.read_text(encoding="utf-8")
    problems = verify_member_proof(text, pem)
    if problems:
        for problem in problems[1:]:
            console.print(f"  {escape(problem)}")
        raise _fail(f"{proof}: {problems[0]}")
    parsed = MemberProof.from_json(text)
    since = (
        ""
        if parsed.since is None
        else f"; consistent with the earlier head of size {parsed.since.size}"
    )
    console.print(
        f"{escape(str(proof))}: OK: {len(parsed.records)} records of {escape(repr(parsed.member))} are in the log"
        f" of size {parsed.head.size} (head {parsed.head.time}){since}"
    )


def rights_command(
    ledger: Ledger_ = DEFAULT_LEDGER,
    policy: Annotated[
        Path, typer.Option("--policy", help="The usage-rights policy TOML.")
    ] = DEFAULT_POLICY,
) -> None:
    """Print what each member's contribution entitles it to under the policy."""
    try:
        rules = load_policy(policy)
        with _open(ledger) as book:
            records, latest_round = book.records(), book.latest_round()
    except (PolicyError, LedgerError) as exc:
        raise _fail(str(exc)) from None
    if latest_round is None:
        raise _fail(f"{ledger}: the ledger is empty, no rights to compute")
    for ent in entitlements(rules, records, latest_round).values():
        console.print(escape(statement(ent)))
