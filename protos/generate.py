"""Regenerates the Python stubs of the wire contract next to the .proto files.

python protos/generate.py          # rewrite ditserve/v1/*_pb2*.py
python protos/generate.py --check  # exit 1 if the checked-in stubs are stale
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "ditserve" / "v1"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(HERE)) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ]
    if protoc.main([*args, *protos]) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "ditserve" / "v1").glob("*_pb2*.py*")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp))
        if args.check:
            stale = sorted(set(fresh.items()) ^ set(generated_files(HERE).items()))
            names = sorted({name for name, _ in stale})
            if names:
                print("stale generated stubs: " + ", ".join(names) + " (run: make protos)", file=sys.stderr)
                return 1
            return 0
        for old in PROTO_DIR.glob("*_pb2*.py*"):
            old.unlink()
        for name, data in fresh.items():
            (PROTO_DIR / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
