"""The benchmark tables of the README and of docs/benchmarks.md, generated from the committed runs in
bench/results/ (never typed by hand).

    python bench/results_table.py                  # print the full tables of every committed run, oldest first
    python bench/results_table.py --readme README.md --full docs/benchmarks.md
        # README.md: a summary per run (our providers' ratios only); docs/benchmarks.md: every record.
        # Each replaces the text between <!-- bench-results:start --> and <!-- bench-results:end -->.

A full table is experiments.records.markdown_table of one run document; a summary is records.summary_table. Both
are headed by where and from which commit the run came.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsc_kernels.experiments import records  # noqa: E402

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def tables(directory: Path, latest: bool = False, summary: bool = False) -> list[str]:
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
            + f"; {doc['method'].get('timing', '')}. File: {Path(doc['path']).relative_to(directory)}",
            "",
        ]
        table = records.summary_table if summary else records.markdown_table
        lines += table(doc["results"]) + [""]
    return lines


def replace_section(path: Path, lines: list[str]) -> bool:
    """Rewrites the marked section of `path`; False (and a message) when it has none."""
    text = path.read_text()
    if START not in text or END not in text:
        print(f"{path} has no {START} ... {END} section; add one where the table belongs", file=sys.stderr)
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--readme", type=Path, help="write the per-run summaries into this file's marked section")
    parser.add_argument("--full", type=Path, help="write every run's full table into this file's marked section")
    # every run by default: a short run (part of a lease) must not hide the complete one before it
    parser.add_argument("--latest", action="store_true", help="only the latest run per (suite, device)")
    args = parser.parse_args(argv)
    # a mistyped --results found no runs, and --readme then replaced the published tables with "No benchmark runs"
    if not args.results.is_dir():
        parser.error(f"argument --results: {args.results} is not a folder")
    for option, path in (("--readme", args.readme), ("--full", args.full)):
        if path is not None and not path.is_file():  # read_text raised FileNotFoundError or IsADirectoryError
            parser.error(f"argument {option}: {path} is not a file")
    full = tables(args.results, args.latest)
    if args.readme is None and args.full is None:
        print("\n".join(full or ["No benchmark runs under " + str(args.results)]))
        return 0
    if not full:
        parser.error(f"argument --results: no benchmark runs under {args.results}; the tables are left as they are")
    ok = True
    if args.readme is not None:
        ok &= replace_section(args.readme, tables(args.results, args.latest, summary=True))
    if args.full is not None:
        ok &= replace_section(args.full, full)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
