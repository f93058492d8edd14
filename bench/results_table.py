"""The README's benchmark table, generated from the committed runs in bench/results/ (never typed by hand).

    python bench/results_table.py                  # print the tables of every committed run, oldest first
    python bench/results_table.py --readme README.md
        # replace the text between <!-- bench-results:start --> and <!-- bench-results:end --> in README.md

Each table is experiments.records.markdown_table of one run document, headed by where and from which commit it came.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsc_kernels.experiments import records  # noqa: E402

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def tables(directory: Path, latest: bool = False) -> list[str]:
    runs = [d for d in records.load_runs(directory) if not d.get("method", {}).get("dry_run")]
    if latest:  # the latest run of each (suite, device) only
        latest = {(d["suite"], d["environment"].get("device")): d for d in runs}
        runs = list(latest.values())
    lines: list[str] = []
    for doc in runs:
        env = doc["environment"]
        clocks = env.get("nvidia_smi") or {}
        lines += [
            f"#### {doc['suite']}: {env.get('device')}, {doc['created']}",
            "",
            f"commit {str(env.get('commit'))[:12]} (source {env.get('source_hash')}), torch {env.get('torch')}, "
            f"triton {env.get('triton')}, CUDA {env.get('cuda')}"
            + (f", SM clock {clocks.get('clocks.sm')} MHz" if clocks.get("clocks.sm") else "")
            + f"; {doc['method'].get('timing', '')}. File: {Path(doc['path']).name}",
            "",
        ]
        lines += records.markdown_table(doc["results"]) + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--readme", type=Path, help="rewrite the marked section of this file")
    # every run by default: a short run (part of a lease) must not hide the complete one before it
    parser.add_argument("--latest", action="store_true", help="only the latest run per (suite, device)")
    args = parser.parse_args(argv)
    lines = tables(args.results, args.latest) or ["No benchmark runs under " + str(args.results)]
    if args.readme is None:
        print("\n".join(lines))
        return 0
    text = args.readme.read_text()
    if START not in text or END not in text:
        print(f"{args.readme} has no {START} ... {END} section; add one where the table belongs", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
