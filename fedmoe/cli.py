"""The `fedmoe` command: demo, init, run, export."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.config import ConfigError, RunConfig

app = typer.Typer(help="fedmoe: federated training of one mixture-of-experts language model.", no_args_is_help=True)
console = Console()

Workspace_ = Annotated[Path, typer.Option("--workspace", "-w", help="Folder of the embedded consortium.")]


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"--config {pair!r}: expected key=value")
        value: object
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def _run_config(workspace: Path, overrides: list[str], **named: object) -> RunConfig:
    user = _parse_overrides(overrides)
    user.update({k: v for k, v in named.items() if v is not None})
    user["workspace"] = str(workspace.resolve())
    return RunConfig.from_user_config(user)


@app.command()
def init(
    workspace: Workspace_ = Path(".fedmoe/demo"),
    from_pretrained: Annotated[Path | None, typer.Option(help="Local HF MoE checkpoint directory to use as the base.")] = None,
    pretrain_steps: Annotated[int, typer.Option(help="Pre-training steps of the tiny base.")] = 300,
) -> None:
    """Build the demo corpora, the tokenizer and the pre-trained tiny base (what is missing)."""
    from server.workspace import Workspace
    from server.init import InitConfig, init_workspace

    _init(Workspace(workspace.resolve()), InitConfig(pretrain_steps=pretrain_steps), from_pretrained)


def _init(ws, config, from_pretrained=None) -> None:  # type: ignore[no-untyped-def]
    from rich.progress import Progress

    from model.base import BaseModelError
    from model.families import UnsupportedModel
    from model.corpus import DataError
    from server.init import init_workspace

    with Progress(console=console, transient=True) as progress:
        task = None

        def on_step(step: int, total: int, loss: float) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task("pre-training the base", total=total)
            progress.update(task, completed=step, description=f"pre-training the base (loss {loss:.2f})")

        try:
            init_workspace(ws, config, from_pretrained=from_pretrained, log=progress.console.print, on_step=on_step)
        except (DataError, BaseModelError, UnsupportedModel, OSError) as exc:
            raise _fail(str(exc)) from None


@app.command()
def run(
    workspace: Workspace_ = Path(".fedmoe/demo"),
    rounds: Annotated[int | None, typer.Option(help="num-rounds")] = None,
    members: Annotated[int | None, typer.Option(help="Simulated members (default: all in the workspace).")] = None,
    config: Annotated[list[str], typer.Option("--config", "-c", help="Run-config override key=value (repeatable).")] = [],  # noqa: B006
    run_name: Annotated[str, typer.Option(help="Name of the run folder (resume continues it).")] = "default",
) -> None:
    """Run the configured rounds in Flower's simulation engine (resumes a committed run)."""
    try:
        cfg = _run_config(workspace, config, **{"num-rounds": rounds})
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    _simulate(cfg, members, run_name)


def _simulate(cfg: RunConfig, members: int | None, run_name: str, free_rider: bool = False):  # type: ignore[no-untyped-def]
    from fedmoe.console import RichReporter, round_tables
    from fedmoe.processes import sigterm_interrupts
    from fedmoe.simulation import SimulationFailed, simulate
    from server.checkpoint import Checkpoints
    from server.summary import summary_from_dict
    from server.workspace import Workspace

    reporter = RichReporter(console)
    sigterm_interrupts()  # SIGTERM stops the local SuperLink and its simulation too, as Ctrl-C does
    try:
        simulate(cfg, reporter, num_members=members, run_name=run_name, free_rider=free_rider)
    except SimulationFailed as exc:
        raise _fail(str(exc)) from None
    finally:
        reporter.stop()
    manifests = Checkpoints(Workspace(cfg.workspace_path).run_dir(run_name)).manifests()
    summaries = [summary_from_dict(m) for m in manifests]
    for table in round_tables(summaries):
        console.print(table)
    return summaries


@app.command()
def export(
    workspace: Workspace_ = Path(".fedmoe/demo"),
    run_name: Annotated[str, typer.Option(help="Run whose last committed round is exported.")] = "default",
    out: Annotated[Path | None, typer.Option(help="Release folder (default <workspace>/releases/<run>-round-N).")] = None,
) -> None:
    """Write the last committed round as a release (HF base + PEFT adapter + merged model)."""
    _export(workspace.resolve(), run_name, out)


def _export(root: Path, run_name: str, out: Path | None) -> Path:
    from server.workspace import Workspace
    from server.checkpoint import Checkpoints
    from server.release import ReleaseError, export_release

    ws = Workspace(root)
    committed = Checkpoints(ws.run_dir(run_name)).load()
    if committed is None:
        raise _fail(f"{ws.run_dir(run_name)}: no committed round to export (run `fedmoe run` first)")
    target = out or ws.release_dir(f"{run_name}-round-{committed.round}")
    try:
        release = export_release(ws.base, committed.state, target, round=committed.round, val_loss=committed.manifest["val_loss"])
    except ReleaseError as exc:
        raise _fail(str(exc)) from None
    console.print(f"release of round {release.round} written to [bold]{release.path}[/bold]")
    return release.path


DEMO_SECURE_CODEC, DEMO_SECURE_CLIP = "int8", 0.05
DEMO_UPDATE_CLIP = 3.0  # members' own L2 bound under secure aggregation: 2-3x an honest demo update (0.9-1.4)
# Local SGD with a server FedYogi (adaptive federated optimization): on the demo's one-domain-per-
# member consortium, averaging members' local-AdamW updates cancels most of their gains (README).
# The server lr ramps up over 3 rounds (a full first FedYogi step made every domain worse for three
# rounds) and is set per parameter kind: the output head takes the full 0.1, the adapters and the
# router, which a step of that size makes worse, a fraction of it (bench/recipes.py; README).
DEMO_TRAINING = {"local-opt": "sgd", "lr": 1.0, "server-opt": "fedyogi", "server-lr": 0.1, "server-warmup": 3,
                 "local-steps": 14, "server-lr-attention": 0.2, "server-lr-experts": 0.3, "server-lr-router": 0.1,
                 "server-lr-head": 1.0}
DEMO_ROUNDS = 12


@app.command()
def demo(
    workspace: Workspace_ = Path(".fedmoe/demo"),
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = DEMO_ROUNDS,
    members: Annotated[int | None, typer.Option(help="Members (default: one per demo domain).")] = None,
    fresh: Annotated[bool, typer.Option(help="Start the run over instead of resuming it.")] = False,
    secure: Annotated[bool, typer.Option(help="Secure aggregation (the operator sees only sums; contribution from group sums). --no-secure: plain updates, open-mode contribution (run 'demo-open').")] = True,
    free_rider: Annotated[bool, typer.Option(help="Add the labelled free rider: a member that claims tokens and sends noise.")] = True,
) -> None:
    """The whole consortium on this machine: build what is missing, train, export a release."""
    import shutil

    from server.workspace import Workspace
    from server.init import InitConfig

    started = time.perf_counter()
    ws = Workspace(workspace.resolve())
    console.rule("fedmoe demo")
    _init(ws, InitConfig())
    run_name = "demo" if secure else "demo-open"
    if fresh:
        shutil.rmtree(ws.run_dir(run_name), ignore_errors=True)
    mode = {"secagg": "on", "codec": DEMO_SECURE_CODEC, "codec-clip": DEMO_SECURE_CLIP, "update-clip": DEMO_UPDATE_CLIP} if secure else {}
    cfg = _run_config(ws.root, [], **{"num-rounds": rounds}, **DEMO_TRAINING, **mode)
    _refuse_another_recipe(ws.run_dir(run_name), cfg)
    rider = " + free-rider (labelled: claims tokens, sends noise)" if free_rider else ""
    console.print(f"consortium: {', '.join(ws.members()[: members or None])}{rider} ({os.cpu_count()} CPU cores)")
    console.print(
        f"secure aggregation on: updates leave as {DEMO_SECURE_CODEC} (clip {DEMO_SECURE_CLIP}) masked integers, the "
        f"operator sees only sums; each round trains groups of 3 and contribution is estimated across rounds "
        f"from group sums: a member is credited once its value stands out from the noise (the default "
        f"{DEMO_ROUNDS} rounds credited every honest member when measured; fewer rounds may credit fewer; "
        f"--no-secure: open mode, each update scored)"
        if secure else "secure aggregation off: the operator sees each member's update (open-mode contribution)"
    )
    summaries = _simulate(cfg, members, run_name, free_rider=free_rider)
    path = _export(ws.root, run_name, None)
    rights = _demo_verdict(ws, run_name, summaries, free_rider)
    _demo_hub(ws, run_name, rights, free_rider)
    console.print(f"done in {time.perf_counter() - started:.0f}s; release: [bold]{path}[/bold]")


def _refuse_another_recipe(run_dir: Path, cfg) -> None:  # type: ignore[no-untyped-def]
    """A demo run trained with another server optimizer cannot resume: say how to start it over."""
    from server.checkpoint import Checkpoints
    from server.config import changed_server_settings

    manifests = Checkpoints(run_dir).manifests() if run_dir.is_dir() else []
    was, now = (manifests[-1].get("run_config", {}) if manifests else {}), cfg.as_user_config()
    changed = changed_server_settings(was, now)
    if len(manifests) > 1 and changed:
        key, before, after = changed[0]
        raise _fail(f"{run_dir}: trained with {key} {before!r}, the demo's recipe now has "
                    f"{after!r}; `fedmoe demo --fresh` starts the demo's run over")


def _demo_verdict(ws, run_name: str, summaries: list, free_rider: bool) -> dict:  # type: ignore[no-untyped-def]
    """The demo's outcome in words: what the model learned, and what each member gets for it."""
    from fedmoe.console import rights_table
    from client.free_rider import FREE_RIDER
    from server.ledger import Ledger
    from server.rights import entitlements, load_policy

    first, last = summaries[0], summaries[-1]
    start = first.val_loss  # round 0: the base model
    drops = {d: 1 - math.exp(last.val_loss[d] - start[d]) for d in sorted(last.val_loss)}
    console.print("validation perplexity of the consortium model, before training -> now:")
    for d, drop in drops.items():
        console.print(f"  {d:>12}: {math.exp(start[d]):8.1f} -> {math.exp(last.val_loss[d]):8.1f}  ({abs(drop):.1%} {'better' if drop >= 0 else 'worse'})")
    with Ledger(ws.ledger(run_name), create=False) as book:
        rights = entitlements(load_policy(ws.policy), book.records(), book.latest_round())
    console.print(rights_table(rights, {FREE_RIDER: "free rider"} if free_rider else {}))
    honest = [m for m in rights if m != FREE_RIDER]
    credited = [m for m in honest if rights[m].share > 0]
    console.print(f"{len(credited)} of {len(honest)} honest members credited with a share > 0.")
    if free_rider and FREE_RIDER in rights:
        ent = rights[FREE_RIDER]
        caught = ent.share == 0 and ent.tier == "base-only"
        console.print(
            f"the free rider claimed an honest member's tokens and sent noise: share {ent.share:.1%}, "
            + ("base model only, no quota (caught)." if caught else f"rights '{ent.tier}' (NOT caught).")
        )
    return rights


def _demo_hub(ws, run_name: str, rights: dict, free_rider: bool) -> None:  # type: ignore[no-untyped-def]
    """The best-credited member uses the release through the model hub; the free rider is refused."""
    from client.free_rider import FREE_RIDER
    from fedmoe.hub_cmd import demo_through_hub

    entitled = sorted((e.share, m) for m, e in rights.items() if e.tier != "base-only" and m != FREE_RIDER)
    demo_through_hub(ws, run_name, entitled[-1][1] if entitled else None,
                     FREE_RIDER if free_rider and FREE_RIDER in rights else None)


def _mount() -> None:
    from fedmoe.ledger_cmd import ledger_app, rights_command

    from fedmoe.deploy_cmd import certs_command, join_command, keys_command, report_command, serve_command, submit_command
    from fedmoe.hub_cmd import generate_command, hub_command, pull_command, usage_command

    app.add_typer(ledger_app, name="ledger")
    app.command("keys", help="Member: create this member's keys on its own machine and a registration file.")(keys_command)
    app.command("certs", help="Operator: the consortium CA and TLS certificate; register and revoke members.")(certs_command)
    app.command("serve", help="Operator: SuperLink with TLS, node authentication, persistent state, metrics.")(serve_command)
    app.command("join", help="Member daemon: a SuperNode with this member's data, state dir, device and keys.")(join_command)
    app.command("submit", help="Submit the fedmoe app to a SuperLink (flwr run).")(submit_command)
    app.command("report", help="PNG plots and a Markdown summary of a run.")(report_command)
    app.command("rights", help="Print each member's entitlement from the ledger and the policy.")(rights_command)
    app.command("hub", help="Operator: the model hub (TLS): members pull the base and the releases their rights allow.")(hub_command)
    app.command("pull", help="Member: download a release or the base from the hub, verified and resumable.")(pull_command)
    app.command("generate", help="Member: text from the newest release you may use, hosted by the hub, metered per token.")(generate_command)
    app.command("usage", help="Member: this period's metered tokens and quota, checked against the signed usage log.")(usage_command)


_mount()


def main() -> None:
    from model.chatter import silence_library_chatter

    silence_library_chatter()
    app()
