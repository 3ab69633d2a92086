"""``fedshift study CONFIG``: run a study's grid of simulations and summarise it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from simulations.study import CellOutcome, StudyError, load_study, run_study
from simulations.study_summary import summarise


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``study`` subcommand on the ``fedshift`` parser's subparsers."""
    p = sub.add_parser(
        "study",
        description="Run every cell of the study file CONFIG (see simulations/studies/) under "
                    "--out, skipping cells that finished before, then write summary.csv, "
                    "sites.csv, summary.md and plots there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG", help="study file (TOML)")
    p.add_argument("--out", type=Path, required=True, help="the study's directory")
    p.add_argument("--data-dir", default="",
                   help="directory holding the data file (else $FEDSHIFT_DATA_DIR, ~/.medmnist)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 8),
                   help="cells run at once (each is a whole federation: on a small machine, 1)")
    p.add_argument("--summary-only", action="store_true",
                   help="only summarise the cells that have finished")
    p.add_argument("--verbose", action="store_true", help="log more (each cell logs to its "
                   "own log.txt either way)")


def run_study_command(args: argparse.Namespace) -> int:
    """Run the study, print each cell as it ends and where the summary is; 1 if any failed."""
    from tqdm import tqdm

    study = load_study(args.config)
    if args.jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {args.jobs}")
    failed: list[CellOutcome] = []
    if not args.summary_only:
        print(f"study {study.name}: {len(study.cells)} cells, {args.jobs} at a time, "
              f"in {args.out}")
        bar = tqdm(total=len(study.cells), desc="cells", unit="cell")

        def on_cell(outcome: CellOutcome) -> None:
            if outcome.status == "failed":
                failed.append(outcome)
                bar.write(f"FAILED {outcome.cell.label()} (log: {outcome.cell_dir}/log.txt)")
            else:
                bar.set_postfix_str(f"{outcome.status}: {outcome.cell.label()}")
            bar.update(1)

        try:
            run_study(study, args.out, args.data_dir, args.jobs, on_cell)
        finally:
            bar.close()
    summary = summarise(args.out, f"Study {study.name}")
    for claim in summary["claims"]:
        print(f"[{'holds' if claim.holds else 'FAILS'}] {claim.text}: {claim.evidence}")
    print(f"\nsummary: {args.out / 'summary.md'} ({len(summary['rows'])} cells)")
    for outcome in failed:
        print(f"\nfailed: {outcome.cell.label()}\n{outcome.detail}")
    return 1 if failed else 0
