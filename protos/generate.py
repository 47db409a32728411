"""Regenerate the hub's Python stubs from protos/hub.proto with grpcio-tools' protoc.

    python -m protos.generate            rewrite protos/hub_pb2.py, hub_pb2_grpc.py, hub_pb2.pyi
    python -m protos.generate --check    exit 1 when the committed stubs differ from a fresh run

The stubs are committed (a member's install needs no compiler); tests/test_hub_protos.py fails
when they are stale. Run from any directory: paths are taken from this file's place.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
SOURCES = ("hub.proto",)
OUTPUTS = ("hub_pb2.py", "hub_pb2_grpc.py", "hub_pb2.pyi")


def generate(out: Path) -> list[Path]:
    """Compile SOURCES into `out`/protos/; returns the files written. Imports resolve as
    `from protos import hub_pb2` (the proto path is the repository root)."""
    from grpc_tools import protoc  # a build tool: only this script needs it

    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    for source in SOURCES:
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", str(PROTOS / source)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS / source}")
    return [out / "protos" / name for name in OUTPUTS]


def stale() -> list[str]:
    """The committed stubs that differ from what the proto compiles to now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh if not (PROTOS / p.name).is_file() or (PROTOS / p.name).read_bytes() != p.read_bytes()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args()
    if args.check:
        differ = stale()
        print("stubs are current" if not differ else f"stale: {', '.join(differ)} (run python -m protos.generate)")
        return 1 if differ else 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (PROTOS / path.name).write_bytes(path.read_bytes())
            print(f"wrote {PROTOS / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
