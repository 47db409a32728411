"""The model hub's speed: pulling a release against copying the same files, and hosted generation
against transformers' generate in the member's own process.

One invocation, side by side, on the demo workspace's newest release (run "demo"):
- pull: `fedmoe hub` runs as its own process (TLS, as deployed); the best-credited member pulls
  the release with client/pull.pull (signature check, chunked stream, sha256 of every file,
  rename into place) into a fresh folder; against `shutil.copyfile` of the same files from the
  hub's folder to a fresh folder (no checks). 1 puller against 1 copier, then 10 concurrent
  pullers (threads of this process: gRPC's C core does the transfer) against 10 concurrent
  copiers. Bytes are counted as they land (the files' sizes on disk after each run), throughput
  is bytes / wall seconds; runs alternate pull and copy, 3 each, and the median is reported.
  A third arm, verify, reads and sha256-hashes the same files n at once with no network (what a
  pull must do on top of receiving the bytes): its ratio to the copy is the most a pull can reach
  on this machine however fast the transport is.
- generate: the same prompts (the first words of each validation domain), greedy, max 64 new
  tokens, through the hub (tokens counted from the hub's final chunk, what it debits) against
  `AutoModelForCausalLM.from_pretrained(<release>/merged).generate` here (tokens counted from
  the returned ids); both warmed once (the hub loads the model on its first request), then 3
  passes over the prompts each, alternating, and the median tokens/s reported.
Writes bench/results/hub.json: single_client_ratio_vs_copy (target >= 0.5),
concurrent_10_ratio_vs_copy (aggregate, target >= 0.5), generate_ratio_vs_local (tokens/s, target
>= 0.8), verify_only_ratio_vs_copy (the verify arm, the ceiling), with the measurements behind them.
Run: `.venv/bin/python bench/hub.py [--workspace .fedmoe/demo --run demo]` (a few minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.pull import HubClient, pull  # noqa: E402
from privacy.certs import CertLayout, issue, load_cert  # noqa: E402
from privacy.hub_auth import hub_audience  # noqa: E402
from privacy.roster import IDENTITY, identity_key, operator_side_identities  # noqa: E402
from server.hub_catalog import Catalog  # noqa: E402
from server.ledger import Ledger, OperatorKey  # noqa: E402
from server.rights import Policy, entitlements, load_policy  # noqa: E402
from server.workspace import Workspace  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "hub.json"
REPEATS, CONCURRENT, NEW_TOKENS = 3, 10, 64


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _landed(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _parallel(n: int, job) -> float:  # noqa: ANN001
    """Wall seconds for `job(i)` on n threads at once."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            job(i)
        except BaseException as exc:  # noqa: BLE001  (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def measure_transfer(n: int, client_for, rnd: int, source: Path, operator_pem: bytes, scratch: Path) -> dict:  # noqa: ANN001
    files = [p for p in source.rglob("*") if p.is_file()]
    pulls, copies, verifies = [], [], []
    for rep in range(REPEATS):
        outs = [scratch / f"pull-{n}-{rep}-{i}" for i in range(n)]
        seconds = _parallel(n, lambda i: pull(client_for(), rnd, outs[i], operator_pem))
        pulls.append(sum(_landed(o) for o in outs) / seconds)
        for o in outs:
            shutil.rmtree(o)
        outs = [scratch / f"copy-{n}-{rep}-{i}" for i in range(n)]

        def copy(i: int) -> None:
            for f in files:
                target = outs[i] / f.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)

        seconds = _parallel(n, copy)
        copies.append(sum(_landed(o) for o in outs) / seconds)
        for o in outs:
            shutil.rmtree(o)
        hashed = [0] * n

        def verify(i: int) -> None:
            for f in files:
                digest = hashlib.sha256()
                with f.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        digest.update(block)
                        hashed[i] += len(block)

        seconds = _parallel(n, verify)
        verifies.append(sum(hashed) / seconds)
    pull_rate, copy_rate, verify_rate = statistics.median(pulls), statistics.median(copies), statistics.median(verifies)
    return {"clients": n, "pull_bytes_per_s": pull_rate, "copy_bytes_per_s": copy_rate, "ratio": pull_rate / copy_rate,
            "verify_bytes_per_s": verify_rate, "verify_ratio": verify_rate / copy_rate,
            "pull_runs": pulls, "copy_runs": copies, "verify_runs": verifies}


def measure_generation(client: HubClient, merged: Path, prompts: list[str]) -> dict:
    tokenizer, model = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def hub(prompt: str) -> int:
        return list(client.generate(prompt, NEW_TOKENS))[-1].completion_tokens

    def local(prompt: str) -> int:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        return int(out.shape[1] - ids.shape[1])

    hub(prompts[0])  # the hub loads the model on its first request
    local(prompts[0])
    runs: dict[str, list[float]] = {"hub": [], "local": []}
    tokens = {"hub": 0, "local": 0}
    for _ in range(REPEATS):  # alternating, so that a slow spell of the machine hits both
        for name, generate in (("hub", hub), ("local", local)):
            started, count = time.perf_counter(), 0
            for prompt in prompts:
                count += generate(prompt)
            runs[name].append(count / (time.perf_counter() - started))
            tokens[name] += count
    hub_rate, local_rate = statistics.median(runs["hub"]), statistics.median(runs["local"])
    return {"prompts": len(prompts), "repeats": REPEATS, "hub_tokens": tokens["hub"], "local_tokens": tokens["local"],
            "hub_tokens_per_s": hub_rate, "local_tokens_per_s": local_rate, "ratio": hub_rate / local_rate,
            "hub_runs": runs["hub"], "local_runs": runs["local"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--run", default="demo")
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    key = OperatorKey.load(ws.operator_key)
    with Ledger(ws.ledger(args.run), create=False) as book:
        rights = entitlements(load_policy(ws.policy) if ws.policy.is_file() else Policy(), book.records(), book.latest_round())
    member = max((e.share, m) for m, e in rights.items() if e.tier == "latest")[1]
    catalog = Catalog(ws, args.run, key)
    rnd = catalog.latest_round()
    source = catalog.get(rnd).folder  # exported here if it was not yet, so the hub's first pull is not timed on it
    with tempfile.TemporaryDirectory(dir=ws.root) as tmp:
        scratch = Path(tmp)
        layout = CertLayout(scratch / "certs")
        issue(layout.root, [])
        operator_side_identities(layout, [member])
        port = _free_port()
        hub = subprocess.Popen([sys.executable, "-c", "from fedmoe.cli import main; main()", "hub", "--workspace", str(ws.root),
                                "--run", args.run, "--certs", str(layout.root), "--port", str(port), "--metrics-port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def client_for() -> HubClient:
                return HubClient.connect(f"127.0.0.1:{port}", member, identity_key(layout.member_dir(member) / IDENTITY),
                                         hub_audience(load_cert(layout.ca_cert)), ca_pem=layout.ca_cert.read_bytes())

            deadline = time.monotonic() + 120
            while True:
                try:
                    client_for().releases()
                    break
                except Exception:  # noqa: BLE001  (the hub is still starting)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            pem = key.public_key_pem()
            single = measure_transfer(1, client_for, rnd, source, pem, scratch)
            concurrent = measure_transfer(CONCURRENT, client_for, rnd, source, pem, scratch)
            prompts = [" ".join(json.loads((ws.validation_dir / f"{d}.jsonl").open().readline())["text"].split()[:6])
                       for d in ws.validation_domains()]
            generation = measure_generation(client_for(), source / "merged", prompts)
        finally:
            hub.terminate()
            hub.wait(timeout=30)
    table = Table(title=f"hub vs local, release of round {rnd} ({_landed(source) / 2**20:.0f} MiB), member {member}")
    for col in ("measure", "hub", "local", "ratio", "target", "sha256 alone / copy"):
        table.add_column(col, justify="right")
    for name, row in (("pull, 1 client (MiB/s)", single), (f"pull, {CONCURRENT} clients (MiB/s)", concurrent)):
        table.add_row(name, f"{row['pull_bytes_per_s'] / 2**20:.0f}", f"{row['copy_bytes_per_s'] / 2**20:.0f}", f"{row['ratio']:.2f}",
                      ">= 0.5", f"{row['verify_ratio']:.2f}")
    table.add_row("generate (tokens/s)", f"{generation['hub_tokens_per_s']:.1f}", f"{generation['local_tokens_per_s']:.1f}",
                  f"{generation['ratio']:.2f}", ">= 0.8", "")
    console.print(table)
    result = {"single_client_ratio_vs_copy": single["ratio"], "concurrent_10_ratio_vs_copy": concurrent["ratio"],
              "generate_ratio_vs_local": generation["ratio"],
              "verify_only_ratio_vs_copy": {"single": single["verify_ratio"], "concurrent_10": concurrent["verify_ratio"]},
              "targets": {"single_client_ratio_vs_copy": ">= 0.5", "concurrent_10_ratio_vs_copy": ">= 0.5", "generate_ratio_vs_local": ">= 0.8"},
              "release_round": rnd, "release_bytes": _landed(source), "member": member, "repeats": REPEATS,
              "single": single, "concurrent": concurrent, "generation": generation}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
