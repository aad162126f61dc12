"""Mutation score per module from mutmut's results (``mutants/**/*.meta``), with the survivors.

A mutant is *detected* when a test failed on it (killed) or it made the tests run past their
time limit (timeout). Mutants listed as equivalent in the survivors file (a line
``- `mutant.name` equivalent: why``) leave the denominator; every other mutant counts, so a
mutant no test reaches ("no tests") counts as a survivor.

    score = detected / (all mutants - equivalent)

Usage: python scripts/mutation_report.py [--min-score 90] [--survivors-file F] [--group PREFIX ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SURVIVORS_FILE = ROOT / "scripts" / "mutation-survivors.md"
#: mutmut's exit codes (mutmut/stats.py), folded into the four outcomes the score needs.
DETECTED_CODES = {1, 3, 36, -24, 24, 152, 255}  # a test failed, pytest's internal error, or a timeout
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}
#: The groups the score is given for (a path prefix each); the first is the one the target is for.
GROUPS = ("shm_model/+workers/", "tablerag/store.py")
EQUIVALENT_LINE = re.compile(r"^\s*-\s*`([^`]+)`\s*equivalent\b", re.IGNORECASE)
#: Bounds on what is read: a results file is a few hundred kB; the survivors file a few kB.
MAX_META_BYTES = 16 << 20
MAX_SURVIVORS_BYTES = 1 << 20


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0  # wall time of the mutants' test runs

    def add(self, other: Tally) -> None:
        self.counts.update(other.counts)
        self.seconds += other.seconds

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def scored(self) -> int:
        return self.total - self.counts["equivalent"] - self.counts["not run"]

    @property
    def score(self) -> float | None:
        return 100.0 * self.counts["detected"] / self.scored if self.scored else None

    def score_text(self) -> str:
        return "-" if self.score is None else f"{self.score:.1f}%"


def outcome(code: int | None) -> str:
    if code is None:
        return "not run"
    if code in DETECTED_CODES:
        return "detected"
    if code in SURVIVED_CODES:
        return "survived"
    if code in NO_TESTS_CODES:
        return "no tests"
    return "suspicious"  # a crash or an unknown code: not a kill, shown with the survivors


def read_equivalent(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with path.open(encoding="utf-8") as fh:
        text = fh.read(MAX_SURVIVORS_BYTES)
    return {m.group(1) for line in text.splitlines() if (m := EQUIVALENT_LINE.match(line))}


def read_results(mutants_dir: Path) -> dict[str, tuple[dict[str, int | None], float]]:
    """Source path (relative to the repository) -> (mutant name -> exit code, seconds of its test runs)."""
    results: dict[str, tuple[dict[str, int | None], float]] = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        if meta.stat().st_size > MAX_META_BYTES:
            raise SystemExit(f"{meta} is larger than {MAX_META_BYTES} bytes; not a mutmut results file")
        data = json.loads(meta.read_text(encoding="utf-8"))
        codes = data.get("exit_code_by_key", {}) if isinstance(data, dict) else {}
        durations = data.get("durations_by_key", {}) if isinstance(data, dict) else {}
        seconds = sum(v for v in durations.values() if isinstance(v, int | float))
        if codes:
            results[str(meta.relative_to(mutants_dir))[: -len(".meta")]] = (codes, seconds)
    return results


def in_group(path: str, group: str) -> bool:
    return any(path.startswith(prefix) for prefix in group.split("+") if prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants", help="mutmut's work directory")
    parser.add_argument("--survivors-file", type=Path, default=SURVIVORS_FILE, help="where equivalents are listed")
    parser.add_argument("--min-score", type=float, default=0.0, help="exit 1 when the first group scores less")
    parser.add_argument("--quiet", action="store_true", help="the table only, no list of survivors")
    args = parser.parse_args(argv)

    if not args.mutants.is_dir():
        print(f"no results in {args.mutants}: run scripts/mutation.sh first", file=sys.stderr)
        return 2
    equivalent = read_equivalent(args.survivors_file)
    results = read_results(args.mutants)
    tallies: dict[str, Tally] = {}
    survivors: list[tuple[str, str]] = []
    for path, (codes, seconds) in results.items():
        tally = tallies.setdefault(path, Tally(seconds=seconds))
        for name, code in sorted(codes.items()):
            kind = "equivalent" if name in equivalent else outcome(code)
            tally.counts[kind] += 1
            if kind in ("survived", "no tests", "suspicious"):
                survivors.append((kind, name))
    stale = sorted(equivalent - {name for codes, _ in results.values() for name in codes})

    columns = ("detected", "survived", "no tests", "suspicious", "equivalent", "not run")
    print(f"{'module':<34}{'mutants':>8}" + "".join(f"{c:>11}" for c in columns) + f"{'score':>8}")
    group_tallies = {group: Tally() for group in GROUPS}
    for path in sorted(tallies):
        tally = tallies[path]
        for group in GROUPS:
            if in_group(path, group):
                group_tallies[group].add(tally)
        row = "".join(f"{tally.counts[c]:>11}" for c in columns)
        print(f"{path:<34}{tally.total:>8}{row}{tally.score_text():>8}")
    print()
    for group, tally in group_tallies.items():
        if tally.total:
            print(f"score {group}: {tally.score_text()} ({tally.counts['detected']} of {tally.scored} non-equivalent)")
            if tally.counts["not run"]:
                print(f"  ({tally.counts['not run']} mutants not run yet: the score is of the others)")
    if not args.quiet and survivors:
        print(f"\n{len(survivors)} mutants not detected (see them with: mutmut show NAME):")
        for kind, name in survivors:
            print(f"  {kind:<10} {name}")
    if stale:
        print(f"\n{len(stale)} equivalent mutants listed in {args.survivors_file.name} no longer exist:")
        for name in stale:
            print(f"  {name}")
    first = group_tallies[GROUPS[0]]
    if first.total and (first.score or 0.0) < args.min_score:
        print(f"\nscore {first.score_text()} for {GROUPS[0]} is under {args.min_score:g}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
