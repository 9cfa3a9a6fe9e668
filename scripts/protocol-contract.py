#!/usr/bin/env python3
"""Write the protocol's machine-readable contract under docs/: asyncapi.yaml (AsyncAPI
3.0) and schemas/<Message>.json, built from agent/protocol.py and the examples of
docs/protocol.md (agent/protocol_asyncapi.py).

    .venv/bin/python scripts/protocol-contract.py            # write
    .venv/bin/python scripts/protocol-contract.py --check    # exit 1 if not current
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The contract of this tree's protocol.py, even where the venv's editable install
# points at another checkout (a git worktree).
sys.path.insert(0, str(ROOT))

from agent.protocol_asyncapi import REGENERATE, contract_files  # noqa: E402

DOCS = ROOT / "docs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help="the docs folder (default: %(default)s)"
    )
    args = parser.parse_args()
    docs: Path = args.docs
    files = contract_files((docs / "protocol.md").read_text(encoding="utf-8"))
    stale = [
        path
        for path, text in files.items()
        if not (docs / path).is_file() or (docs / path).read_text(encoding="utf-8") != text
    ]
    extra = sorted(
        str(f.relative_to(docs))
        for f in (docs / "schemas").glob("*.json")
        if str(f.relative_to(docs)) not in files
    )
    if args.check:
        for path in stale:
            print(f"{docs / path} is not what agent/protocol.py generates", file=sys.stderr)
        for path in extra:
            print(f"{docs / path} is no message of agent/protocol.py", file=sys.stderr)
        if stale or extra:
            print(f"regenerate with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    for path in stale:
        target = docs / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(files[path], encoding="utf-8")
        print(f"wrote {target}")
    for path in extra:
        (docs / path).unlink()
        print(f"removed {docs / path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
