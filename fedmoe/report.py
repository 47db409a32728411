"""`fedmoe report`: PNG plots and a Markdown summary of a run, from its committed round manifests.

    <out>/loss.png      validation loss per domain per round
    <out>/bytes.png     bytes up (updates) and down (state) per round
    <out>/shares.png    cumulative contribution share per member per round (when scored)
    <out>/cost.png      estimated cost per round and cumulative (server/metrics.py formula)
    <out>/summary.md    the same numbers as tables, with the prices used

Only committed rounds are read (server/checkpoint.Checkpoints), so a report of a running or
crashed run shows exactly what is on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from server.checkpoint import Checkpoints
from server.metrics import Prices, manifest_cost


class ReportError(RuntimeError):
    """The run has nothing to report (no committed round)."""


@dataclass(frozen=True)
class Report:
    out: Path
    plots: dict[str, Path]
    summary: Path
    notes: list[str] = field(default_factory=list)


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_loss(manifests: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    rounds = [m["round"] for m in manifests]
    domains = sorted({d for m in manifests for d in m["val_loss"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    for domain in domains:
        ax.plot(rounds, [m["val_loss"].get(domain, math.nan) for m in manifests], marker="o", label=domain)
    ax.set(xlabel="round", ylabel="validation loss", title="Validation loss per domain")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_bytes(manifests: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    rounds = [m["round"] for m in manifests]
    up = [m.get("bytes_up", 0) / 2**20 for m in manifests]
    down = [m.get("bytes_down", 0) / 2**20 for m in manifests]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.4
    ax.bar([r - width / 2 for r in rounds], down, width, label="down (state to members)")
    ax.bar([r + width / 2 for r in rounds], up, width, label="up (updates from members)")
    ax.set(xlabel="round", ylabel="MiB", title="Bytes per round (all members)")
    ax.set_xticks(rounds)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_shares(manifests: Sequence[dict[str, Any]], path: Path) -> Path | None:
    scored = [m for m in manifests if m.get("shares")]
    if not scored:
        return None
    plt = _pyplot()
    members = sorted({k for m in scored for k in m["shares"]})
    rounds = [m["round"] for m in scored]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(scored)
    for member in members:
        values = [float(m["shares"].get(member, 0.0)) for m in scored]
        ax.bar(rounds, values, bottom=bottom, label=member)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="round", ylabel="cumulative share", title="Contribution shares", ylim=(0, 1.05))
    if not any(bottom):  # secure mode credits nobody until contributions stand out from the noise
        ax.text(0.5, 0.5, "no member's contribution is distinguishable from zero yet",
                transform=ax.transAxes, ha="center", va="center", color="dimgray")
    ax.set_xticks(rounds)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_cost(costs: Sequence[tuple[int, float]], path: Path, currency: str) -> Path:
    plt = _pyplot()
    rounds = [r for r, _ in costs]
    per_round = [c for _, c in costs]
    cumulative = [sum(per_round[: i + 1]) for i in range(len(per_round))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(rounds, per_round, color="tab:orange", label="per round")
    ax.plot(rounds, cumulative, color="tab:red", marker="o", label="cumulative")
    ax.set(xlabel="round", ylabel=f"estimated cost ({currency})", title="Estimated cost")
    ax.set_xticks(rounds)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def write_report(run_dir: Path, out: Path, prices: Prices | None = None, *, currency: str = "USD") -> Report:
    prices = prices or Prices()
    manifests = Checkpoints(run_dir).manifests()
    if not manifests:
        raise ReportError(f"{run_dir}: no committed round to report")
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    plots = {"loss": plot_loss(manifests, out / "loss.png"), "bytes": plot_bytes(manifests, out / "bytes.png")}
    shares = plot_shares(manifests, out / "shares.png")
    if shares is None:
        notes.append("no contribution shares in the manifests (contribution scoring off): shares.png skipped")
    else:
        plots["shares"] = shares
    costs = [(m["round"], manifest_cost(m, prices)) for m in manifests if m["round"] > 0]
    if costs:
        plots["cost"] = plot_cost([(r, c.total) for r, c in costs], out / "cost.png", currency)
    else:
        notes.append("only the initial round is committed: cost.png skipped")
    if prices.gpu_hour == 0 and prices.million_tokens == 0:
        notes.append("no prices given (--price-gpu-hour, --price-million-tokens): costs are 0; GPU-hours are still counted")
    summary = out / "summary.md"
    summary.write_text(_markdown(run_dir, manifests, costs, prices, currency, plots, notes))
    return Report(out, plots, summary, notes)


def _markdown(run_dir: Path, manifests: Sequence[dict[str, Any]], costs: Sequence[tuple[int, Any]],
              prices: Prices, currency: str, plots: dict[str, Path], notes: Sequence[str]) -> str:
    first, last = manifests[0], manifests[-1]
    domains = sorted({d for m in manifests for d in m["val_loss"]})
    lines = [
        f"# fedmoe run report: `{run_dir.name}`",
        "",
        (f"Committed rounds: {first['round']}..{last['round']} (run folder `{run_dir}`); "
         f"last commit {last.get('time', '?')}, state sha256 `{str(last.get('state_sha256', ''))[:16]}…`."),
        "",
        "## Validation loss per domain",
        "",
        "| domain | round " + str(first["round"]) + " | round " + str(last["round"]) + " | change | ppl " + str(last["round"]) + " |",
        "|---|---:|---:|---:|---:|",
    ]
    for d in domains:
        a, b = first["val_loss"].get(d, math.nan), last["val_loss"].get(d, math.nan)
        lines.append(f"| {d} | {a:.4f} | {b:.4f} | {b - a:+.4f} | {math.exp(b):.1f} |")
    lines += ["", "## Rounds", "", "| round | members | rejected | MiB down | MiB up | seconds | GPU-hours | cost |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_round = dict(costs)
    for m in manifests:
        c = by_round.get(m["round"])
        lines.append(
            f"| {m['round']} | {len(m.get('members', []))} | {len(m.get('rejected', {}))} | "
            f"{m.get('bytes_down', 0) / 2**20:.2f} | {m.get('bytes_up', 0) / 2**20:.2f} | {m.get('seconds', 0.0):.1f} | "
            f"{c.gpu_hours if c else 0.0:.4f} | {c.total if c else 0.0:.4f} |"
        )
    lines += _timing_table(manifests)
    lines += _specialization_table(manifests)
    lines += _privacy_table(manifests)
    total = sum(c.total for _, c in costs)
    lines += ["", (f"Estimated total cost: **{total:.4f} {currency}** at {prices.gpu_hour} {currency}/GPU-hour "
                   f"({prices.member_gpus} GPU per member, {prices.server_gpus} for the server) and "
                   f"{prices.million_tokens} {currency} per million tokens."),
              ("Formula: `gpu_hours = (member_gpus * sum(member training seconds) + server_gpus * round seconds)"
               " / 3600`; `cost = price_gpu_hour * gpu_hours + price_million_tokens * tokens / 1e6`.")]
    spent = [(m["round"], m["dp_member_epsilon"]) for m in manifests if m.get("dp_member_epsilon") is not None]
    if spent:
        lines += ["", "## Member-level differential privacy", "",
                  "ε the consortium's sums have spent after each round (δ as configured, `dp-member-delta`):", "",
                  "| round | ε spent |", "|---:|---:|"] + [f"| {r} | {eps:.3f} |" for r, eps in spent]
    if last.get("shares"):
        lines += ["", f"## Contribution shares after round {last['round']}", "", "| member | share |", "|---|---:|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in sorted(last["shares"].items(), key=lambda kv: -kv[1])]
    lines += ["", "## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _privacy_table(manifests: Sequence[dict[str, Any]]) -> list[str]:
    """Record-level ε each DP member had spent by each round it took part in (its replies said)."""
    spent = {(m["round"], r["member"]): (r["dp_epsilon"], r.get("dp_delta")) for m in manifests
             for r in m.get("members", []) if r.get("dp_epsilon") is not None}
    if not spent:
        return []
    members = sorted({member for _, member in spent})
    deltas = sorted({f"{d:g}" for _, d in spent.values() if d is not None})
    lines = ["", "## Differential privacy (record-level, per member)", "",
             "| round |" + "".join(f" ε {m} |" for m in members), "|---:|" + "---:|" * len(members)]
    for rnd in sorted({r for r, _ in spent}):
        cells = [f"{spent[(rnd, m)][0]:.3g}" if (rnd, m) in spent else "-" for m in members]
        lines.append(f"| {rnd} |" + "".join(f" {c} |" for c in cells))
    lines += ["", (f"ε is what each member's DP-SGD has spent on its data so far (opacus's accountant, at δ "
                   f"{', '.join(deltas)}); `-`: the member did not take part that round or trains without DP.")]
    return lines


STAGES = ("sample", "broadcast", "train", "validate", "secure", "score", "aggregate", "evaluate")


def _timing_table(manifests: Sequence[dict[str, Any]]) -> list[str]:
    """Where each round's wall time went (server/rounds.py's stages), and the members' training share."""
    timed = [m for m in manifests if m.get("timing")]
    if not timed:
        return []
    lines = ["", "## Where the round time went (seconds)", "",
             "| round | total | " + " | ".join(STAGES) + " | members training | training share |",
             "|---:|---:|" + "---:|" * len(STAGES) + "---:|---:|"]
    for m in timed:
        seconds = float(m.get("seconds", 0.0))
        training = float(m.get("members_train_seconds", 0.0))
        share = training / seconds if seconds > 0 else 0.0
        cells = " | ".join(f"{float(m['timing'].get(stage, 0.0)):.2f}" for stage in STAGES)
        lines.append(f"| {m['round']} | {seconds:.1f} | {cells} | {training:.1f} | {share:.0%} |")
    lines += ["", ("`train` runs from sending TRAIN to the last reply (the members' training and the transport); "
                   "`members training` is the sum of the members' own training seconds, so the share exceeds "
                   "100% when members train in parallel.")]
    return lines


def _specialization_table(manifests: Sequence[dict[str, Any]]) -> list[str]:
    """How members share experts per round (open rounds; secure ones show only sums to the operator)."""
    rows = [m for m in manifests if m.get("specialization")]
    if not rows:
        return []
    members = sorted({k for m in rows for k in m["specialization"].get("routing_entropy", {})})
    lines = ["", "## Expert specialization", "",
             "| round | top member's share of an expert |" + "".join(f" entropy {m} |" for m in members),
             "|---:|---:|" + "---:|" * len(members)]
    for m in rows:
        spec = m["specialization"]
        top = spec.get("expert_top_member_share")
        cells = [f"{spec['routing_entropy'][k]:.2f}" if spec.get("routing_entropy", {}).get(k) is not None else "–"
                 for k in members]
        lines.append(f"| {m['round']} | {'not known (secure)' if top is None else f'{top:.0%}'} |" + "".join(f" {c} |" for c in cells))
    lines += ["", ("An expert's top-member share is the part of its routed tokens that came from the member that "
                   "routed most to it (1/members: shared evenly; 100%: owned); entropy is a member's routing "
                   "entropy over the experts, normalized (1: uniform).")]
    return lines


console = Console(stderr=True)


def report_command(
    run_dir: Annotated[Path, typer.Option(help="Run folder (<workspace>/runs/<run>).")] = Path(".fedmoe/demo/runs/demo"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default <run-dir>/report).")] = None,
    price_gpu_hour: Annotated[float, typer.Option(help="Price of a GPU-hour.")] = 0.0,
    price_million_tokens: Annotated[float, typer.Option(help="Price per million training tokens.")] = 0.0,
    member_gpus: Annotated[float, typer.Option(help="GPUs billed per member while it trains.")] = 1.0,
    server_gpus: Annotated[float, typer.Option(help="GPUs billed for the server per round.")] = 1.0,
    currency: Annotated[str, typer.Option(help="Currency label of the prices.")] = "USD",
) -> None:
    """PNG plots (loss per domain, bytes, contribution shares, cost) and a Markdown summary of a run."""
    prices = Prices(price_gpu_hour, price_million_tokens, member_gpus, server_gpus)
    try:
        report = write_report(run_dir.resolve(), (out or run_dir / "report").resolve(), prices, currency=currency)
    except ReportError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(code=1) from None
    for name, path in report.plots.items():
        console.print(f"{name:>7}: {path}")
    for note in report.notes:
        console.print(f"   note: {note}")
    console.print(f"summary: [bold]{report.summary}[/bold]")
