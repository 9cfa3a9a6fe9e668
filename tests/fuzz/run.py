"""``make fuzz``: every decoder of hostile bytes under a coverage-guided fuzzer.

With atheris installed, each target of tests/fuzz/targets.py runs for
``--seconds`` (default 40) from a corpus seeded with valid messages, kept in
``.fuzz/corpus/<target>`` so later runs start where the last ones stopped; a
crash is written to ``.fuzz/crashes/`` and fails the run. Without atheris (it has
no wheel for some platforms), the hypothesis properties run with a large example
count instead. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.fuzz import targets

ROOT = Path(__file__).resolve().parents[2]


def _seed(corpus: Path, name: str) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for data in targets.seeds()[name]:
        (corpus / f"seed-{hashlib.sha256(data).hexdigest()[:16]}").write_bytes(data)


def run_atheris(names: list[str], seconds: int, workdir: Path) -> int:
    failed = []
    for name in names:
        corpus = workdir / "corpus" / name
        crashes = workdir / "crashes"
        crashes.mkdir(parents=True, exist_ok=True)
        _seed(corpus, name)
        print(f"== fuzz {name}: {seconds}s", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "tests.fuzz.atheris_target", name,
             f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-max_len=300000",
             f"-artifact_prefix={crashes}/{name}-", "-print_final_stats=1", str(corpus)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        print(f"fuzz: findings in {', '.join(failed)} (see {workdir}/crashes)")
        return 1
    print(f"fuzz: no findings in {', '.join(names)}")
    return 0


def run_hypothesis(names: list[str], examples: int) -> int:
    print(f"atheris is not installed: hypothesis with {examples} examples per target")
    selector = " or ".join(f"[{n}]" for n in names)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_fuzz_properties.py", "-k", selector],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "FUZZ_EXAMPLES": str(examples)},
    ).returncode  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=sorted(targets.TARGETS))
    parser.add_argument("--seconds", type=int, default=40, help="per target (atheris)")
    parser.add_argument("--examples", type=int, default=20000, help="per target (hypothesis)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".fuzz")
    parser.add_argument("--hypothesis", action="store_true", help="even if atheris is there")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(targets.TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if args.hypothesis or importlib.util.find_spec("atheris") is None:
        return run_hypothesis(args.targets, args.examples)
    return run_atheris(args.targets, args.seconds, args.workdir)


if __name__ == "__main__":
    sys.exit(main())
