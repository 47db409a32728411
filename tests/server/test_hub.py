"""The model hub on a real gRPC server on 127.0.0.1: rights checked per call, verified resumable pulls."""

from __future__ import annotations

import datetime
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peft import PeftModel
from transformers import AutoModelForCausalLM

from client.pull import HubClient, PullError, pull
from model.base import load_base
from privacy.certs import CertLayout, issue, load_cert
from privacy.hub_auth import AuthError, hub_audience, make_token, verify_manifest
from privacy.roster import IDENTITY, identity_key, member_keys, register, revoke
from protos import hub_pb2
from server.hub import Hub, Roster, serve
from server.ledger import Ledger, OperatorKey, Record, utc_now
from server.checkpoint import Checkpoints
from server.release import export_release
from server.workspace import Workspace

# shares after round 4 under the default policy: latest >= 0.10, delayed >= 0.02 (2 rounds), base-only below
SHARES = {"acme": 0.7, "globex": 0.05, "rider": 0.0}
RELEASES = (2, 4)


@dataclass
class Consortium:
    ws: Workspace
    layout: CertLayout
    nodes: Path
    address: str
    hub: Hub
    server: grpc.Server

    def client(self, member: str, key: Ed25519PrivateKey | None = None, *, tls: bool = True) -> HubClient:
        key = key or identity_key(self.nodes / member / IDENTITY)
        audience = hub_audience(load_cert(self.layout.ca_cert))
        return HubClient.connect(self.address, member, key, audience, ca_pem=self.layout.ca_cert.read_bytes() if tls else None)

    @property
    def operator_pem(self) -> bytes:
        return OperatorKey.load(self.ws.operator_key).public_key_pem()


def _ledger(ws: Workspace) -> None:
    with Ledger(ws.ledger("default"), OperatorKey.load_or_create(ws.operator_key)) as ledger:
        for rnd in range(1, 5):
            ledger.append_round([Record(round=rnd, member=m, score=0.0, share=s, tokens=0, bytes_up=0, bytes_down=0,
                                        dp_epsilon=None, release_sha256="0" * 64, time=utc_now(), kind="share")
                                 for m, s in SHARES.items()])


@pytest.fixture(scope="module")
def consortium(tiny_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("hub")
    shutil.copytree(tiny_workspace.root, root / "ws", ignore=shutil.ignore_patterns("runs", "nodes", "identities.json"))
    ws = Workspace(root / "ws")
    layout = CertLayout(root / "certs")
    issue(layout.root, [])
    for member in (*SHARES, "newcomer"):
        register(layout, member_keys(member, root / "nodes" / member)[0])
    _ledger(ws)
    lora = load_base(ws.base).with_lora()
    generator = torch.Generator().manual_seed(1)
    checkpoints = Checkpoints(ws.run_dir("default"))
    for rnd in range(5):  # committed rounds 0-4; 2 and 4 exported beforehand, 1 and 3 on their first pull
        state = {k: v + 0.05 * rnd * torch.randn(v.shape, generator=generator) for k, v in lora.get_state().items()}
        checkpoints.commit(rnd, state, {"val_loss": {"code": 4.0 - rnd / 10}})
        if rnd in RELEASES:
            export_release(ws.base, state, ws.release_dir(f"default-round-{rnd}"), round=rnd)
    hub = Hub(ws, "default", OperatorKey.load(ws.operator_key), Roster(layout))
    server, port = serve(hub, "127.0.0.1:0", certs=layout)
    yield Consortium(ws, layout, root / "nodes", f"127.0.0.1:{port}", hub, server)
    server.stop(grace=None)


def _same_tree(pulled: Path, source: Path) -> None:
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (pulled / rel).read_bytes() == (source / rel).read_bytes(), rel


def test_a_latest_member_pulls_the_newest_release_and_it_loads_with_transformers_and_peft(consortium, tmp_path) -> None:
    client = consortium.client("acme")
    listed = client.releases()
    assert [r.round for r in listed.releases] == [0, 1, 2, 3, 4] and listed.tier == "latest" and listed.latest_round == 4
    seen: list[tuple[int, int]] = []
    manifest = pull(client, 4, tmp_path / "r4", consortium.operator_pem, progress=lambda d, t: seen.append((d, t)))
    assert manifest["round"] == 4 and manifest["ledger_size"] == 4 * len(SHARES)
    _same_tree(tmp_path / "r4", consortium.ws.release_dir("default-round-4"))
    assert seen[-1][0] == seen[-1][1] == sum(f["size"] for f in manifest["files"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "r4" / "base"), tmp_path / "r4" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "r4" / "merged")
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_a_delayed_member_gets_only_old_enough_releases_and_a_base_only_member_the_base(consortium, tmp_path) -> None:
    globex = consortium.client("globex")
    assert [r.round for r in globex.releases().releases] == [0, 1, 2] and globex.releases().tier == "delayed"
    pull(globex, 2, tmp_path / "r2", consortium.operator_pem)
    with pytest.raises(PullError, match=r"PERMISSION_DENIED.*'globex' \(delayed, 5.00% credited\) may pull releases up to round 2, not round 4"):
        pull(globex, 4, tmp_path / "r4", consortium.operator_pem)
    with pytest.raises(grpc.RpcError) as refused:  # not even a chunk of a file it may not have
        next(iter(globex.download(4, "adapter/adapter_model.safetensors", 0)))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for member in ("rider", "newcomer"):  # credited 0, and registered with no record yet
        client = consortium.client(member)
        assert [r.round for r in client.releases().releases] == [0] and client.releases().tier == "base-only"
        with pytest.raises(PullError, match="PERMISSION_DENIED.*the base model only"):
            pull(client, 2, tmp_path / f"{member}-r2", consortium.operator_pem)
    base = pull(consortium.client("rider"), 0, tmp_path / "base", consortium.operator_pem)
    _same_tree(tmp_path / "base", consortium.ws.base)
    assert base["base_sha256"] == pull(consortium.client("acme"), 4, tmp_path / "acme-r4", consortium.operator_pem)["base_sha256"]


def test_unknown_forged_expired_and_revoked_callers_are_refused(consortium, tmp_path) -> None:
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("fedmoe_hub_refusals_total", {"reason": "UNAUTHENTICATED"}) or 0.0

    def code_of(client: HubClient) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as refused:
            client.releases()
        return refused.value.code()

    assert code_of(consortium.client("stranger", Ed25519PrivateKey.generate())) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(consortium.client("acme", Ed25519PrivateKey.generate())) == grpc.StatusCode.UNAUTHENTICATED  # not acme's key
    stub = consortium.client("acme").stub
    key = identity_key(consortium.nodes / "acme" / IDENTITY)
    audience = hub_audience(load_cert(consortium.layout.ca_cert))
    for token, why in (
        (make_token("acme", key, audience, "/fedmoe.hub.v1.Hub/ListReleases", now=0.0), "expired"),
        (make_token("acme", key, audience, "/fedmoe.hub.v1.Hub/GetUsage"), "made for"),  # another method's
        (make_token("acme", key, "0" * 64, "/fedmoe.hub.v1.Hub/ListReleases"), "another consortium"),
        (None, "no token"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListReleases(hub_pb2.ListReleasesRequest(), metadata=[("authorization", token)] if token else [])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in refused.value.details()
    register(consortium.layout, member_keys("leaver", consortium.nodes / "leaver")[0])
    leaver = consortium.client("leaver")
    assert [r.round for r in leaver.releases().releases] == [0]
    revoke(consortium.layout, "leaver")
    assert code_of(leaver) == grpc.StatusCode.UNAUTHENTICATED  # from its next call, no restart
    assert REGISTRY.get_sample_value("fedmoe_hub_refusals_total", {"reason": "UNAUTHENTICATED"}) == before + 7
    token = make_token("acme", key, audience, "/fedmoe.hub.v1.Hub/ListReleases")  # seen by a terminating proxy
    assert stub.ListReleases(hub_pb2.ListReleasesRequest(), metadata=[("authorization", token)]).tier == "latest"
    with pytest.raises(grpc.RpcError) as replayed:
        stub.ListReleases(hub_pb2.ListReleasesRequest(), metadata=[("authorization", token)])
    assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED and "already used" in replayed.value.details()


def test_a_pull_cut_halfway_resumes_to_identical_files(consortium, tmp_path) -> None:
    client = consortium.client("acme")

    class Cut(Exception):
        pass

    def cut(done: int, total: int) -> None:
        if done > total // 2:
            raise Cut

    with pytest.raises(Cut):
        pull(client, 4, tmp_path / "r4", consortium.operator_pem, progress=cut)
    staging = tmp_path / ".r4.pull"
    assert not (tmp_path / "r4").exists() and any(p.name.endswith(".part") for p in staging.rglob("*"))
    fetched: list[int] = []
    pull(client, 4, tmp_path / "r4", consortium.operator_pem, progress=lambda d, t: fetched.append(d))
    _same_tree(tmp_path / "r4", consortium.ws.release_dir("default-round-4"))
    assert not staging.exists()


def test_a_tampered_file_or_manifest_is_detected_and_not_used(consortium, tmp_path) -> None:
    client = consortium.client("acme")
    consortium.hub.catalog.get(2)  # the signed manifest is built before the file is altered
    target = consortium.ws.release_dir("default-round-2") / "adapter" / "adapter_config.json"
    original = target.read_bytes()
    target.write_bytes(original.replace(b"\"r\"", b"\"R\""))
    try:
        with pytest.raises(PullError, match="adapter/adapter_config.json: sha256 does not match the signed manifest"):
            pull(client, 2, tmp_path / "r2", consortium.operator_pem)
        assert not (tmp_path / "r2").exists()
    finally:
        target.write_bytes(original)
    forged = OperatorKey.load_or_create(tmp_path / "other.pem").public_key_pem()  # a hub signing with another key
    with pytest.raises(PullError, match="signature does not verify with the operator's key"):
        pull(client, 2, tmp_path / "r2b", forged)
    real = consortium.hub.catalog.get(2)
    flipped = real.manifest_json.replace(b'"round":2', b'"round":4')
    with pytest.raises(AuthError, match="signature does not verify"):
        verify_manifest(flipped, real.signature, consortium.operator_pem)
    pull(client, 2, tmp_path / "r2c", consortium.operator_pem)  # and the hub still serves
    _same_tree(tmp_path / "r2c", consortium.ws.release_dir("default-round-2"))


def test_ten_concurrent_pulls_and_malformed_requests_do_not_disturb_each_other(consortium, tmp_path) -> None:
    client = consortium.client("acme")
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            pull(consortium.client("acme"), 4, tmp_path / f"c{i}", consortium.operator_pem)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    from prometheus_client import REGISTRY

    served = REGISTRY.get_sample_value("fedmoe_hub_bytes_served_total", {"member": "acme"}) or 0.0
    for t in threads:
        t.start()
    bad = [((4, "adapter/adapter_config.json", 10**9, 0), grpc.StatusCode.OUT_OF_RANGE, "past the end"),
           ((9, "adapter/adapter_config.json", 0, 0), grpc.StatusCode.NOT_FOUND, "no release of round 9 on this hub"),
           ((4, "../../operator/operator_ed25519.pem", 0, 0), grpc.StatusCode.NOT_FOUND, "has no file"),
           ((4, "adapter/adapter_config.json", 0, 64 << 20), grpc.StatusCode.INVALID_ARGUMENT, "over the hub's")]
    for args, code, words in bad:
        with pytest.raises(grpc.RpcError) as refused:
            list(client.download(*args))
        assert refused.value.code() == code and words in refused.value.details()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i in range(10):
        _same_tree(tmp_path / f"c{i}", consortium.ws.release_dir("default-round-4"))
    assert client.usage().tier == "latest"
    size = sum(p.stat().st_size for p in consortium.ws.release_dir("default-round-4").rglob("*") if p.is_file())
    assert REGISTRY.get_sample_value("fedmoe_hub_bytes_served_total", {"member": "acme"}) == served + 10 * size


def test_fedmoe_hub_and_fedmoe_pull_as_commands_over_tls(consortium, tmp_path) -> None:
    """The operator's `fedmoe hub` process and a member's `fedmoe pull`: the newest release it may
    pull by default, a one-line refusal for one it may not."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cli = [sys.executable, "-c", "from fedmoe.cli import main; main()"]
    hub = subprocess.Popen([*cli, "hub", "--workspace", str(consortium.ws.root), "--certs", str(consortium.layout.root),
                            "--port", str(port), "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        operator_pub = tmp_path / "operator.pub.pem"
        operator_pub.write_bytes(consortium.operator_pem)
        common = ["--hub", f"127.0.0.1:{port}", "--ca", str(consortium.layout.ca_cert), "--operator-key", str(operator_pub)]
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run([*cli, "pull", *common, "--member", "globex", "--state-dir", str(consortium.nodes / "globex"),
                                   "--out", str(tmp_path / "globex")], capture_output=True, text=True)
            if done.returncode == 0 or time.monotonic() > deadline or "UNAVAILABLE" not in done.stdout:
                break
            time.sleep(0.5)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "entitlement delayed" in done.stdout and "release of round 2 pulled" in done.stdout
        _same_tree(tmp_path / "globex", consortium.ws.release_dir("default-round-2"))
        refused = subprocess.run([*cli, "pull", *common, "--member", "rider", "--state-dir", str(consortium.nodes / "rider"),
                                  "--round", "4", "--out", str(tmp_path / "rider")], capture_output=True, text=True)
        assert refused.returncode == 1 and not (tmp_path / "rider").exists()
        assert "error: hub refused (PERMISSION_DENIED): member 'rider' (base-only, 0.00% credited) may pull the base model only" in refused.stdout
        acme = ["--hub", f"127.0.0.1:{port}", "--ca", str(consortium.layout.ca_cert), "--member", "acme",
                "--state-dir", str(consortium.nodes / "acme")]
        said = subprocess.run([*cli, "generate", *acme, "--prompt", "the manual says", "--max-new-tokens", "8"],
                              capture_output=True, text=True)
        assert said.returncode == 0 and "prompt +" in said.stdout and "(release of round 4)" in said.stdout, said.stdout + said.stderr
        bill = subprocess.run([*cli, "usage", *acme, "--operator-key", str(operator_pub)], capture_output=True, text=True)
        assert bill.returncode == 0 and "acme: latest, 70.00% credited as of round 4" in bill.stdout, bill.stdout + bill.stderr
        assert "each verified in the usage log" in bill.stdout
    finally:
        hub.terminate()
        out, _ = hub.communicate(timeout=30)
    assert hub.returncode == 0 and "hub on 127.0.0.1" in out and "hub stopped" in out


def test_generation_debits_exactly_the_counted_tokens_the_bill_verifies_and_quota_is_enforced(consortium, tmp_path) -> None:
    from transformers import AutoTokenizer

    from fedmoe.hub_cmd import BillError, verify_bill
    from server.rights import DEFAULT_POLICY_TOML

    policy = consortium.ws.policy
    original = policy.read_bytes() if policy.is_file() else None
    policy.write_text(DEFAULT_POLICY_TOML.replace("1_000_000", "300"))  # acme 280 tokens, globex 20
    try:
        acme = consortium.client("acme")
        before = acme.usage().used_tokens
        prompt = "the release notes say"
        chunks = list(acme.generate(prompt, 12))
        last = chunks[-1]
        merged = consortium.ws.release_dir("default-round-4") / "merged"
        tokenizer = AutoTokenizer.from_pretrained(merged)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            local = AutoModelForCausalLM.from_pretrained(merged).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        assert last.release_round == 4 and last.prompt_tokens == ids.shape[1]
        assert last.completion_tokens == local.shape[1] - ids.shape[1] > 0
        assert "".join(c.text for c in chunks) == tokenizer.decode(local[0, ids.shape[1]:], skip_special_tokens=True)
        usage = acme.usage()
        assert usage.used_tokens == before + last.prompt_tokens + last.completion_tokens and usage.quota_tokens == 280
        entries = verify_bill(usage, consortium.operator_pem, "acme")
        assert entries[-1]["prompt_tokens"] == last.prompt_tokens and entries[-1]["release_round"] == 4
        forged = hub_pb2.Usage()
        forged.CopyFrom(usage)
        forged.debits[-1].entry = usage.debits[-1].entry.replace(b'"prompt_tokens":', b'"prompt_tokens":1')
        with pytest.raises(BillError, match="not in the usage log"):
            verify_bill(forged, consortium.operator_pem, "acme")
        forged.CopyFrom(usage)
        forged.used_tokens += 1
        with pytest.raises(BillError, match="the hub charges"):
            verify_bill(forged, consortium.operator_pem, "acme")
        forged.CopyFrom(usage)  # one real debit listed twice, and charged twice
        forged.debits.append(usage.debits[-1])
        forged.used_tokens += last.prompt_tokens + last.completion_tokens
        with pytest.raises(BillError, match="listed twice"):
            verify_bill(forged, consortium.operator_pem, "acme")
        with pytest.raises(BillError, match="not 'globex'"):  # acme's true statement handed to globex
            verify_bill(usage, consortium.operator_pem, "globex")
        with pytest.raises(BillError, match="not the current"):  # an old period's statement
            verify_bill(usage, consortium.operator_pem, "acme", today=datetime.date(2001, 1, 1))
        # a member that reads some text and hangs up is charged for every token produced
        before = acme.usage().used_tokens
        call = acme.generate(prompt, 200)
        got = [next(call).text for _ in range(3)]
        call.cancel()
        deadline = time.monotonic() + 30
        while acme.usage().used_tokens == before and time.monotonic() < deadline:
            time.sleep(0.1)
        cut = json.loads(acme.usage().debits[-1].entry)
        assert cut["completion_tokens"] >= len(got) and acme.usage().used_tokens == before + cut["prompt_tokens"] + cut["completion_tokens"]
        with pytest.raises(grpc.RpcError) as refused:  # 20 tokens cannot hold the prompt and 64 new ones
            list(consortium.client("globex").generate(prompt))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "of its 20 tokens" in refused.value.details()
        while acme.usage().used_tokens + last.prompt_tokens + 12 <= 280:
            list(acme.generate(prompt, 12))
        with pytest.raises(grpc.RpcError) as refused:
            list(acme.generate(prompt, 12))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert acme.usage().used_tokens <= 280
        with pytest.raises(grpc.RpcError) as refused:
            list(consortium.client("rider").generate(prompt))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "may not use hosted generation" in refused.value.details()
    finally:
        if original is None:
            policy.unlink()
        else:
            policy.write_bytes(original)


def test_the_usage_log_survives_a_restart_and_proves_each_debit(tmp_path) -> None:
    from server.ledger.merkle import verify_inclusion
    from server.usage import UsageLog, head_bytes, period_start

    key = OperatorKey.load_or_create(tmp_path / "op.pem")
    log = UsageLog(tmp_path / "usage.sqlite", key)
    period = period_start(30)
    for i in range(5):
        log.debit("acme" if i % 2 == 0 else "globex", period, 3 + i, 10, 4)
    other = UsageLog(tmp_path / "usage.sqlite", key)  # a second hub process on the same log
    other.debit("acme", "1970-01-01", 100, 100, 1)  # another period: not this bill
    other.close()
    log.debit("globex", "1970-01-01", 1, 1, 1)
    log.close()
    log = UsageLog(tmp_path / "usage.sqlite", key)
    assert log.used("acme", period) == (3 + 10) + (5 + 10) + (7 + 10) and log.used("globex", period) == (4 + 10) + (6 + 10)
    head, debits = log.statement("acme", period)
    assert head.size == 7 and [d.index for d in debits] == [0, 2, 4]
    key.public_key.verify(head.signature, head_bytes(head.size, head.root, head.time))
    for d in debits:
        assert verify_inclusion(d.entry, d.index, head.size, d.proof, bytes.fromhex(head.root))
    assert not verify_inclusion(debits[0].entry, 1, head.size, debits[0].proof, bytes.fromhex(head.root))
    assert period_start(30, datetime.date(1970, 2, 5)) == "1970-01-31"
    # quota holds are shared by every hub process on the log: together they never overspend
    one, two = UsageLog(tmp_path / "usage.sqlite", key), UsageLog(tmp_path / "usage.sqlite", key)
    used = one.used("acme", period)
    hold, taken = one.hold("acme", period, 100, used + 150)
    assert hold is not None and taken == used
    assert two.hold("acme", period, 100, used + 150) == (None, used + 100)  # the other process's hold counts
    one.debit("acme", period, 30, 10, 4, hold_id=hold)  # settled: 40 used, the hold gone
    second, taken = two.hold("acme", period, 100, used + 150)
    assert second is not None and taken == used + 40
    two.release_hold(second)
    assert one.hold("acme", period, 111, used + 150) == (None, used + 40)


def test_join_with_hub_fetches_and_verifies_the_base_itself(consortium, tmp_path) -> None:
    import typer

    from fedmoe.hub_cmd import base_from_hub
    from model.base import MANIFEST
    from model.io import sha256_file

    operator_pub = tmp_path / "operator.pub.pem"
    operator_pub.write_bytes(consortium.operator_pem)
    state = consortium.nodes / "newcomer"
    base = base_from_hub(consortium.address, "newcomer", state, consortium.layout.ca_cert, operator_pub, None)
    assert base == (state / "base").resolve()
    expected = sha256_file(consortium.ws.base / MANIFEST)
    assert load_base(base, expected_sha256=expected).sha256 == expected  # what every round checks
    assert base_from_hub(consortium.address, "newcomer", state, consortium.layout.ca_cert, operator_pub, None) == base
    (base / "hub-manifest.sig").write_bytes(b"\0" * 64)  # a pulled folder whose signature no longer verifies
    with pytest.raises(typer.Exit):
        base_from_hub(consortium.address, "newcomer", state, consortium.layout.ca_cert, operator_pub, None)
    with pytest.raises(typer.Exit):
        base_from_hub(consortium.address, "newcomer", state, consortium.layout.ca_cert, None, tmp_path / "b")


def test_a_committed_round_is_exported_once_on_its_first_pull_and_a_stale_export_is_replaced(consortium, tmp_path, monkeypatch) -> None:
    import server.hub_catalog as catalog_module

    checkpoints = Checkpoints(consortium.ws.run_dir("default"))
    stale = consortium.ws.release_dir("default-round-1")  # an earlier run's round 1 under the same name
    export_release(consortium.ws.base, load_base(consortium.ws.base).with_lora().get_state(), stale, round=1)
    exports: list[int] = []
    real = catalog_module.export_release
    monkeypatch.setattr(catalog_module, "export_release", lambda *a, **k: exports.append(k["round"]) or real(*a, **k))
    try:
        listed = {r.round: r for r in consortium.client("acme").releases().releases}
        assert listed[3].total_bytes == 0 and listed[1].total_bytes == 0 and listed[2].total_bytes > 0
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                pull(consortium.client("acme"), 3, tmp_path / f"r3-{i}", consortium.operator_pem)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and exports == [3]
        folder = consortium.ws.release_dir("default-round-3")
        for i in range(4):
            _same_tree(tmp_path / f"r3-{i}", folder)
        pulled = pull(consortium.client("acme"), 1, tmp_path / "r1", consortium.operator_pem)
        assert exports == [3, 1] and pulled["round"] == 1  # the stale folder was exported again from the checkpoint
        info = json.loads((tmp_path / "r1" / "release.json").read_text())
        assert info["state_sha256"] == json.loads((checkpoints.round_dir(1) / "manifest.json").read_text())["state_sha256"]
    finally:
        for rnd in (1, 3):
            shutil.rmtree(consortium.ws.release_dir(f"default-round-{rnd}"), ignore_errors=True)


def test_the_demo_ends_with_a_member_using_the_release_through_the_hub(ws: Workspace, capsys) -> None:
    """`fedmoe demo`'s last step on a tiny consortium's real run: the best-credited member pulls the
    newest release over TLS, generates through the hub and reads its verified bill; a member with
    nothing credited is refused generation."""
    from client.app import app
    from fedmoe.hub_cmd import demo_through_hub
    from server.config import RunConfig
    from server.rights import entitlements, load_policy, Policy
    from server.rounds import run_rounds
    from server.summary import LogReporter

    from fake_grid import FakeGrid, task_identity

    config = RunConfig(workspace=str(ws.root), num_rounds=2, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
                       min_expert_tokens=8, min_members=2, round_timeout=60.0, codec="fp32", contribution="open")
    with task_identity():
        run_rounds(FakeGrid(app, 3), config, LogReporter(), run_name="demo")
    with Ledger(ws.ledger("demo"), create=False) as book:
        rights = entitlements(load_policy(ws.policy) if ws.policy.is_file() else Policy(), book.records(), book.latest_round())
    best = max((e.share, m) for m, e in rights.items())[1]
    assert rights[best].tier == "latest"
    demo_through_hub(ws, "demo", best, "stranger")
    said = capsys.readouterr().out
    assert f"{best} pulled the release of round 2" in said and "operator's signature and every sha256 verified" in said
    assert f"{best} asks the hub to continue" in said and "(bill verified against the signed usage log)" in said
    assert "stranger asks the hub too: hub refused (PERMISSION_DENIED)" in said


def test_a_missing_policy_fails_closed(consortium, tmp_path) -> None:
    from server.hub import Refused
    from server.rights import DEFAULT_POLICY_TOML, PolicyError

    key = OperatorKey.load(consortium.ws.operator_key)
    with pytest.raises(PolicyError, match="no policy file"):
        Hub(consortium.ws, "default", key, Roster(consortium.layout), tmp_path / "typo.toml")
    policy = tmp_path / "policy.toml"
    policy.write_text(DEFAULT_POLICY_TOML.replace("latest_share = 0.10", "latest_share = 0.90"))
    hub = Hub(consortium.ws, "default", key, Roster(consortium.layout), policy)
    assert hub.entitlement("acme")[0].tier == "delayed"  # the operator's stricter policy, not the defaults
    policy.unlink()
    with pytest.raises(Refused) as refused:  # never the defaults' wider rights
        hub.entitlement("acme")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_rights_table_is_reused_until_the_ledger_or_policy_changes(consortium, tmp_path, monkeypatch) -> None:
    import server.hub as hub_module

    ws = Workspace(tmp_path / "ws")
    ws.ledger("default").parent.mkdir(parents=True)
    shutil.copy(consortium.ws.ledger("default"), ws.ledger("default"))
    shutil.copytree(consortium.ws.operator_dir, ws.operator_dir)
    reads = []
    real = hub_module.Ledger
    monkeypatch.setattr(hub_module, "Ledger", lambda *a, **k: reads.append(1) or real(*a, **k))
    hub = Hub(ws, "default", OperatorKey.load(ws.operator_key), Roster(consortium.layout))
    before = [hub.entitlement("globex")[0] for _ in range(5)]
    assert len(reads) == 1 and before[0].tier == "delayed" and before[0].as_of_round == 4
    with real(ws.ledger("default"), OperatorKey.load(ws.operator_key)) as ledger:  # round 5: globex catches up with acme
        ledger.append_round([Record(round=5, member=m, score=0.0, share=0.0 if m == "rider" else 0.5, tokens=0, bytes_up=0,
                                    bytes_down=0, dp_epsilon=None, release_sha256="0" * 64, time=utc_now(), kind="share")
                             for m in SHARES])
    after, latest = hub.entitlement("globex")
    assert len(reads) == 2 and latest == 5 and after.tier == "latest"  # the next call, not after a delay
    assert hub.entitlement("acme")[0].tier == "latest" and len(reads) == 2
    from server.rights import DEFAULT_POLICY_TOML

    ws.policy.write_text(DEFAULT_POLICY_TOML.replace("latest_share = 0.10", "latest_share = 0.99"))
    assert hub.entitlement("acme")[0].tier == "delayed" and len(reads) == 3
    monkeypatch.setattr(hub_module, "RIGHTS_MAX_AGE", 0.0)
    hub.entitlement("acme")
    assert len(reads) == 4  # too old: read again even though nothing changed


def test_the_pull_writer_keeps_order_and_raises_a_write_error_in_the_puller(tmp_path) -> None:
    import errno
    import hashlib

    from client.pull import _Sink

    chunks = [bytes([i]) * (1 << 16) for i in range(20)]
    digest = hashlib.sha256()
    with (tmp_path / "ok").open("ab") as handle, _Sink(handle, digest) as sink:
        for chunk in chunks:
            sink.put(chunk)
    assert (tmp_path / "ok").read_bytes() == b"".join(chunks) and digest.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()

    class Full:
        written = 0

        def write(self, data: bytes) -> None:
            if self.written >= 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += 1

    with pytest.raises(OSError, match="No space left"):
        with _Sink(Full(), hashlib.sha256()) as sink:
            for chunk in chunks:
                sink.put(chunk)
