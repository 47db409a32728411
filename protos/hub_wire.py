"""What both ends of the hub agree on besides the messages: the service's method prefix (what a
token names, privacy/hub_auth.py) and the largest chunk a download carries."""

from __future__ import annotations

from protos import hub_pb2

SERVICE = f"/{hub_pb2.DESCRIPTOR.services_by_name['Hub'].full_name}/"  # "/fedmoe.hub.v1.Hub/"
MAX_CHUNK = 4 << 20  # bytes of file data in one Chunk
MAX_MESSAGE = MAX_CHUNK + (64 << 10)  # a Chunk with its framing
