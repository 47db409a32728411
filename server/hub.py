"""The operator's model hub: a gRPC service (protos/hub.proto) that lets each member list and pull
the releases its rights allow, checked on every call.

    fedmoe hub --workspace W --run R --certs C    (TLS with the operator's server certificate)

Who calls: a token signed with the member's registered identity key (privacy/hub_auth.py),
checked against the CA-signed roster, which is re-read when it changes (a revoked member is
refused from its next call). What it may do: its entitlement, computed from the run's ledger
and the workspace's policy exactly as `fedmoe rights` prints it (server/rights.entitlements);
a registered member with no ledger record yet is base-only. The base (round 0) is open to every
registered member; release N to a member whose entitlement covers round N now.

Refusals are gRPC status codes with a sentence: UNAUTHENTICATED, PERMISSION_DENIED,
RESOURCE_EXHAUSTED, NOT_FOUND, INVALID_ARGUMENT. A refusal or a bad request touches nothing
shared: each call reads the catalog on its own. The entitlement table is computed once per state
of the ledger and the policy (their files' inode, size and mtime, the ledger's WAL included) and
at most RIGHTS_MAX_AGE seconds old: a pull of a release is one call per file, and reading the
ledger on each cost 4.6 ms of the 9 ms a small call took (measured on the demo's ledger).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import Counter

from privacy.certs import CertError, CertLayout, load_cert
from privacy.hub_auth import AuthError, Caller, check_token, hub_audience
from privacy.roster import roster_path, verify_roster
from protos import hub_pb2, hub_pb2_grpc
from protos.hub_wire import MAX_CHUNK, MAX_MESSAGE, SERVICE
from server.hub_catalog import Catalog, CatalogError
from server.hub_generate import Counts, Generator
from server.ledger import Ledger, LedgerError, OperatorKey
from server.rights import Entitlement, Policy, PolicyError, entitlements, load_policy
from server.usage import UsageLog, period_start
from server.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20

MAX_PROMPT_CHARS = 16_000
MAX_NEW_TOKENS, DEFAULT_NEW_TOKENS = 512, 64
MAX_STREAMS = 8  # open downloads and generations per member (of WORKERS threads)
MAX_CALLS = 64  # calls the hub serves at once; more wait in gRPC's queue or are refused
RIGHTS_MAX_AGE = 5.0  # seconds an entitlement table is reused while its files stay unchanged

BYTES_SERVED = Counter("fedmoe_hub_bytes_served", "Release bytes the hub streamed, per member", ["member"])
TOKENS_METERED = Counter("fedmoe_hub_tokens_metered", "Tokens of hosted generation debited, per member and kind",
                         ["member", "kind"])
REFUSALS = Counter("fedmoe_hub_refusals", "Hub calls refused, per reason (gRPC status)", ["reason"])
REFUSAL_REASONS = ("UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED")  # the ones a member meets


def start_series(members: list[str]) -> None:
    """Every known label value exported at 0 from the start (Prometheus's advice for labelled
    counters), so that a dashboard shows 0, not "no data", before the first pull or refusal."""
    for reason in REFUSAL_REASONS:
        REFUSALS.labels(reason)
    for member in members:
        BYTES_SERVED.labels(member)
        for kind in ("prompt", "completion"):
            TOKENS_METERED.labels(member, kind)


class Refused(Exception):
    """A call the hub refuses: the gRPC code and a sentence for the member."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Roster:
    """The CA-signed roster, re-read when the file changes."""

    layout: CertLayout
    _stamp: tuple[int, int, int] | None = None
    _members: dict[str, bytes] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.audience = hub_audience(load_cert(self.layout.ca_cert))

    def members(self) -> dict[str, bytes]:
        path = roster_path(self.layout)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # written by replacing: a new inode
        with self._lock:
            if stamp != self._stamp:
                self._members = verify_roster(path.read_bytes(), load_cert(self.layout.ca_cert), str(path))
                self._stamp = stamp
                start_series(sorted(self._members))
            return dict(self._members or {})


class Hub(hub_pb2_grpc.HubServicer):
    def __init__(self, ws: Workspace, run: str, key: OperatorKey, roster: Roster, policy: Path | None = None) -> None:
        self.ws, self.run, self.roster = ws, run, roster
        self.catalog = Catalog(ws, run, key)
        self.policy_path = policy if policy is not None else ws.policy
        if policy is not None and not policy.is_file():
            raise PolicyError(f"{policy}: no policy file")
        self.policy_required = self.policy_path.is_file()  # once there, a missing policy refuses calls
        self.usage = UsageLog(ws.operator_dir / f"usage-{run}.sqlite", key)
        self.generator = Generator()
        self._streams: dict[str, int] = {}  # member -> open downloads and generations
        self._nonces: dict[str, float] = {}  # token nonces seen -> their expiry
        self._streams_lock = threading.Lock()
        self._rights: tuple[tuple, float, Policy, dict[str, Entitlement], int] | None = None  # stamp, when, ...
        self._rights_lock = threading.Lock()
        start_series(sorted(roster.members()))

    # -------------------------------------------------------------- who and what

    def caller(self, context: grpc.ServicerContext, method: str) -> Caller:
        token = dict(context.invocation_metadata()).get("authorization")
        try:
            caller = check_token(token if isinstance(token, str) else None, self.roster.members(), self.roster.audience,
                                 SERVICE + method)
        except (AuthError, CertError) as exc:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        now = time.time()
        with self._streams_lock:  # each token once: a replayed one is refused until it has expired anyway
            self._nonces = {n: t for n, t in self._nonces.items() if t > now} if len(self._nonces) > 1024 else self._nonces
            if caller.nonce in self._nonces:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"token for {caller.member!r} was already used")
            self._nonces[caller.nonce] = caller.expires
        return caller

    def entitlement(self, member: str) -> tuple[Entitlement, int]:
        """(the member's entitlement, the ledger's latest round): what `fedmoe rights` prints."""
        policy, table, latest = self._table()
        found = table.get(member)
        if found is None:  # registered, never recorded: nothing credited yet
            found = Entitlement(member, 0.0, "base-only", 0, policy.period_days, policy.delay_rounds, latest)
        return found, latest

    def _stamp(self) -> tuple:
        path = self.ws.ledger(self.run)
        stamps = []
        for file in (path, path.with_name(path.name + "-wal"), self.policy_path):
            try:
                stat = file.stat()
                stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def _table(self) -> tuple[Policy, dict[str, Entitlement], int]:
        """(policy, every member's entitlement, latest round), reused while the files are unchanged."""
        stamp, now = self._stamp(), time.monotonic()
        with self._rights_lock:
            if self._rights is not None and self._rights[0] == stamp and now - self._rights[1] < RIGHTS_MAX_AGE:
                return self._rights[2:]
        try:
            policy = load_policy(self.policy_path) if self.policy_required or self.policy_path.is_file() else Policy()
            path = self.ws.ledger(self.run)
            records, latest = [], None
            if path.is_file():
                with Ledger(path, create=False) as ledger:
                    records, latest = ledger.records(), ledger.latest_round()
        except (PolicyError, LedgerError) as exc:
            log.error("hub: cannot compute entitlements: %s", exc)
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the hub cannot read its ledger or policy now; try again later") from None
        latest = latest or 0
        table = entitlements(policy, records, latest)
        with self._rights_lock:
            self._rights = (stamp, now, policy, table, latest)
        return policy, table, latest

    @staticmethod
    def may_pull(entitlement: Entitlement, latest: int, rnd: int) -> bool:
        """The base (round 0) for every registered member; a release as the entitlement allows."""
        return rnd == 0 or entitlement.may_pull(rnd, latest)

    def release(self, member: str, ref: hub_pb2.ReleaseRef):  # noqa: ANN201
        rnd = int(ref.round)
        if rnd not in self.catalog.folders():
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no release of round {rnd} on this hub" if rnd else "the hub has no base model yet")
        entitlement, latest = self.entitlement(member)
        if not self.may_pull(entitlement, latest, rnd):
            newest = entitlement.max_release_round(latest)
            allowed = "the base model only" if newest is None else f"releases up to round {newest}"
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"member {member!r} ({entitlement.tier}, {entitlement.share:.2%} credited) may pull {allowed}, "
                          f"not round {rnd}")
        try:
            return self.catalog.get(rnd)
        except CatalogError as exc:
            raise Refused(grpc.StatusCode.NOT_FOUND, str(exc)) from None

    # -------------------------------------------------------------- RPCs

    def ListReleases(self, request, context):  # noqa: ANN001, ANN201, N802
        with refusals(context):
            member = self.caller(context, "ListReleases").member
            entitlement, latest = self.entitlement(member)
            visible = []
            for rnd in sorted(self.catalog.folders()):
                if rnd <= latest and self.may_pull(entitlement, latest, rnd):
                    published = self.catalog.exported(rnd)  # None: exported on its first pull
                    visible.append(hub_pb2.ReleaseInfo(round=rnd, total_bytes=published.total_bytes if published else 0,
                                                       files=len(published.files) if published else 0, base=rnd == 0))
            return hub_pb2.ListReleasesReply(releases=visible, latest_round=latest, tier=entitlement.tier)

    def GetManifest(self, request, context):  # noqa: ANN001, ANN201, N802
        with refusals(context):
            published = self.release(self.caller(context, "GetManifest").member, request.release)
            return hub_pb2.SignedManifest(manifest_json=published.manifest_json, signature=published.signature)

    def Download(self, request, context) -> Iterator[hub_pb2.Chunk]:  # noqa: ANN001, N802
        with refusals(context):
            member = self.caller(context, "Download").member
            published = self.release(member, request.release)
            if request.path not in published.files:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"release of round {published.round} has no file {request.path[:200]!r}")
            size, _ = published.files[request.path]
            chunk = request.chunk_bytes or DEFAULT_CHUNK
            if chunk > MAX_CHUNK:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_bytes {chunk} is over the hub's {MAX_CHUNK} (4 MiB)")
            if request.offset > size:
                raise Refused(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of {request.path!r} ({size} bytes)")
            path = published.folder / request.path
            if path.stat().st_size != size:
                raise Refused(grpc.StatusCode.UNAVAILABLE, f"{request.path!r} is being replaced on the hub; try again")
        yield from self._stream(context, path, request.offset, size, chunk, member)

    def _stream(self, context, path: Path, offset: int, size: int, chunk: int, member: str) -> Iterator[hub_pb2.Chunk]:  # noqa: ANN001
        with refusals(context), self.streaming(member), path.open("rb") as handle:
            handle.seek(offset)
            while offset < size and context.is_active():
                data = handle.read(min(chunk, size - offset))
                if not data:
                    break
                BYTES_SERVED.labels(member).inc(len(data))
                yield hub_pb2.Chunk(offset=offset, data=data)
                offset += len(data)

    @contextlib.contextmanager
    def streaming(self, member: str) -> Iterator[None]:
        """One of the member's at most MAX_STREAMS open streams (so no member holds every worker)."""
        with self._streams_lock:
            if self._streams.get(member, 0) >= MAX_STREAMS:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"member {member!r} already has {MAX_STREAMS} downloads or generations open; wait for one to end")
            self._streams[member] = self._streams.get(member, 0) + 1
        try:
            yield
        finally:
            with self._streams_lock:
                self._streams[member] -= 1

    def Generate(self, request, context) -> Iterator[hub_pb2.GenerateChunk]:  # noqa: ANN001, N802
        with refusals(context):
            member = self.caller(context, "Generate").member
            entitlement, latest = self.entitlement(member)
            newest = entitlement.max_release_round(latest)
            if not newest:  # None: base-only; 0: delayed, and no release is old enough yet
                raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                              f"member {member!r} ({entitlement.tier}, {entitlement.share:.2%} credited) may not use hosted generation"
                              + ("" if newest is None else " until a release is old enough for its tier"))
            usable = [r for r in self.catalog.folders() if 1 <= r <= newest]
            if not usable:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"no release up to round {newest} is published on this hub yet")
            rnd = max(usable)
            if not request.prompt or len(request.prompt) > MAX_PROMPT_CHARS:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"prompt must be 1-{MAX_PROMPT_CHARS} characters")
            if request.max_new_tokens > MAX_NEW_TOKENS:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens {request.max_new_tokens} is over {MAX_NEW_TOKENS}")
            new_tokens = request.max_new_tokens or DEFAULT_NEW_TOKENS
            try:
                folder = self.catalog.get(rnd).folder
            except CatalogError as exc:
                raise Refused(grpc.StatusCode.NOT_FOUND, str(exc)) from None
            prompt_tokens = self.generator.count(folder, request.prompt)
            period = period_start(entitlement.period_days)
            wanted = prompt_tokens + new_tokens
            hold, taken = self.usage.hold(member, period, wanted, entitlement.quota_tokens)
            if hold is None:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"member {member!r} has used {taken:,} of its {entitlement.quota_tokens:,} tokens this period "
                              f"(since {period}, generations in flight included); this request may need {wanted:,}")
        yield from self._generate(context, member, folder, rnd, request.prompt, new_tokens, period, hold)

    def _generate(self, context, member: str, folder: Path, rnd: int, prompt: str, new_tokens: int, period: str,
                  hold: int) -> Iterator[hub_pb2.GenerateChunk]:  # noqa: ANN001
        counts = Counts()
        pieces = self.generator.stream(folder, prompt, new_tokens, counts, keep_going=context.is_active)
        try:
            with refusals(context), self.streaming(member):
                for piece in pieces:
                    yield hub_pb2.GenerateChunk(text=piece, release_round=rnd)
        finally:  # charged for what was produced, also when the caller went away or generation failed
            pieces.close()  # waits for the worker: the counts are final after this
            if counts.prompt_tokens:  # settles the hold; if writing fails, the hold stays until it expires
                self.usage.debit(member, period, counts.prompt_tokens, counts.completion_tokens, rnd, hold_id=hold)
                TOKENS_METERED.labels(member, "prompt").inc(counts.prompt_tokens)
                TOKENS_METERED.labels(member, "completion").inc(counts.completion_tokens)
            else:
                self.usage.release_hold(hold)
        yield hub_pb2.GenerateChunk(prompt_tokens=counts.prompt_tokens, completion_tokens=counts.completion_tokens,
                                    release_round=rnd)

    def GetUsage(self, request, context):  # noqa: ANN001, ANN201, N802
        with refusals(context):
            member = self.caller(context, "GetUsage").member
            entitlement, _ = self.entitlement(member)
            period = period_start(entitlement.period_days)
            head, debits = self.usage.statement(member, period)
            used = sum(entry["prompt_tokens"] + entry["completion_tokens"] for entry in (json.loads(d.entry) for d in debits))
            reply = hub_pb2.Usage(member=member, tier=entitlement.tier, share=entitlement.share,
                                  quota_tokens=entitlement.quota_tokens, used_tokens=used,
                                  period_start=period, period_days=entitlement.period_days, as_of_round=entitlement.as_of_round,
                                  debits=[hub_pb2.Debit(index=d.index, entry=d.entry, proof=d.proof) for d in debits])
            if head is not None:
                reply.log_size, reply.log_root, reply.log_time, reply.log_signature = head.size, head.root, head.time, head.signature
            return reply


class refusals:  # noqa: N801  (a context manager used as `with refusals(context):`)
    """Turns Refused into the call's gRPC status (and counts it); anything else is logged and
    answered INTERNAL without the details, so one bad call never takes the service down."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:  # noqa: ANN001
        if exc is None:
            return False
        if isinstance(exc, Refused):
            REFUSALS.labels(exc.code.name).inc()
            self.context.abort(exc.code, exc.message)
        if isinstance(exc, grpc.RpcError) or kind is GeneratorExit:
            return False
        REFUSALS.labels("INTERNAL").inc()
        log.exception("hub: call failed")
        self.context.abort(grpc.StatusCode.INTERNAL, f"the hub failed on this call ({kind.__name__}); the operator's log has the details")
        return False


def serve(hub: Hub, address: str, *, certs: CertLayout | None, workers: int = 32) -> tuple[grpc.Server, int]:
    """Start the hub on `address` ("host:port"; port 0 picks one); returns (server, port). TLS with
    the operator's server certificate from `certs`; `certs=None` is plaintext, for unit tests only."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=MAX_CALLS,
                         options=[("grpc.max_receive_message_length", 1 << 20), ("grpc.max_send_message_length", MAX_MESSAGE)])
    hub_pb2_grpc.add_HubServicer_to_server(hub, server)
    if certs is None:
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"hub: cannot listen on {address}")
    server.start()
    return server, port
