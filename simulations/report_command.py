"""``fedshift report DIR``: a run's report, as Markdown with plots and as one HTML page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``report`` subcommand.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The subparsers of the ``fedshift`` parser.
    """
    p = sub.add_parser(
        "report",
        description="Read DIR/results.json (written by `fedshift simulate --out DIR`) and write "
                    "report.md with its plots under plots/, and report.html, one "
                    "self-contained page with the same content.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="directory of a simulated run")
    p.add_argument("--out", type=Path, default=None,
                   help="write report.md, plots/ and report.html here (default: DIR)")
    p.add_argument("--verbose", action="store_true", help="log each file written")


def run_report(args: argparse.Namespace) -> int:
    """Write the report of the run in ``args.dir`` and print the paths written.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of the ``report`` subcommand: ``dir`` and ``out`` (None:
        write into ``dir``).

    Returns
    -------
    int
        0 when the report was written; 2 when the run's results are missing or
        malformed, or the report cannot be written (the error goes to stderr).
    """
    from server.run_report import load_run
    from simulations.simulation_report import write_simulation_report

    try:
        results = load_run(args.dir)
        files = write_simulation_report(results, args.dir if args.out is None else args.out)
    except (OSError, ValueError) as exc:
        print(f"fedshift: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {files.markdown}")
    print(f"page: {files.html}")
    return 0
