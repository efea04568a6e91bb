"""Regenerate the committed gRPC stubs from proto/ (`make proto`), or check they are current.

The stubs live in the package `server.proto`, so the generated `from beastserve.v1 import ...`
lines are rewritten to that package; the proto file keeps its own name for reflection.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "server" / "proto"
PROTOS = ["beastserve/v1/generate.proto"]


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}", *(str(PROTO_DIR / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = sorted(out_dir.glob("beastserve/v1/*_pb2*.py*"))
    for path in files:
        path.write_text(path.read_text().replace("from beastserve.v1 import", "from server.proto.beastserve.v1 import"))
    return files


def stale_files() -> list[str]:
    """Generated files that differ from what is committed."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [str(p.relative_to(tmp)) for p in fresh
                if not (OUT_DIR / p.relative_to(tmp)).is_file()
                or (OUT_DIR / p.relative_to(tmp)).read_text() != p.read_text()]


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        stale = stale_files()
        print("stale: " + ", ".join(stale) if stale else "stubs are current")
        sys.exit(1 if stale else 0)
    for path in generate(OUT_DIR):
        print(path.relative_to(ROOT))
