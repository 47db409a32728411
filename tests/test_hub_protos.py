"""The committed hub stubs are what protos/hub.proto compiles to (python -m protos.generate)."""

from __future__ import annotations

from protos import generate, hub_pb2


def test_the_committed_stubs_are_current() -> None:
    assert generate.stale() == [], "protos/hub.proto changed: run `python -m protos.generate` and commit the stubs"


def test_the_stubs_describe_the_hub_service() -> None:
    service = hub_pb2.DESCRIPTOR.services_by_name["Hub"]
    assert [m.name for m in service.methods] == ["ListReleases", "GetManifest", "Download", "Generate", "GetUsage"]
    assert service.methods_by_name["Download"].server_streaming
