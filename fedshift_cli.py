"""The ``fedshift`` command line: it dispatches each command to the side it belongs to.

- ``fedshift site check|run|unit``: a hospital's site (:mod:`client.site_cli`);
- ``fedshift credentials``: development certificates for the server
  (:mod:`server.credentials_cli`);
- ``fedshift simulate``, ``study`` and ``report``: simulated federations
  (:mod:`simulations.cli`, :mod:`simulations.study_command`,
  :mod:`simulations.report_command`).

This module sits above the four packages (``common``, ``client``, ``server``,
``simulations``), outside all of them, and imports a command's module only once
that command is chosen: a hospital's ``fedshift site run`` loads nothing from
``simulations`` or ``server``, and ``fedshift --help`` loads no side at all. The
one-line summaries ``fedshift --help`` lists live here, in :data:`COMMANDS`; each
command's arguments and description live with the command.

``python -m fedshift_cli`` runs the same command line (the systemd unit of a site
uses it where the ``fedshift`` script is not installed).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

DESCRIPTION = ("fedshift: federated fine-tuning for hospitals under differential privacy, "
               "with each site's covariate and label shift estimated.")


@dataclass(frozen=True)
class Command:
    """A ``fedshift`` command: its line in ``fedshift --help`` and where it lives.

    Attributes
    ----------
    summary : str
        What it does, in the list of commands.
    module : str
        The module holding it, imported only when the command is chosen.
    add_parser : str
        The module's function registering the command's parser on the ``fedshift``
        parser's subparsers (``(subparsers) -> None``).
    run : str
        The module's function carrying the command out (``(args) -> exit code``).
    """

    summary: str
    module: str
    add_parser: str
    run: str


COMMANDS: dict[str, Command] = {
    "simulate": Command("run a simulated federation of hospitals",
                        "simulations.cli", "add_simulate_parser", "run_simulate"),
    "report": Command("write a run's report (report.md with plots, and report.html)",
                      "simulations.report_command", "add_report_parser", "run_report"),
    "study": Command("run a grid of simulations (methods x epsilon x sites x ...) and "
                     "summarise it",
                     "simulations.study_command", "add_study_parser", "run_study_command"),
    "credentials": Command("make a development CA, SuperLink certificate and site key pairs",
                           "server.credentials_cli", "add_credentials_parser",
                           "run_credentials"),
    "site": Command("check, run or install a hospital site (a Flower SuperNode)",
                    "client.site_cli", "add_site_parser", "run_site_command"),
}
"""Every ``fedshift`` command, in the order ``fedshift --help`` lists them."""


def _is_user_error(exc: Exception) -> bool:
    """Whether ``exc`` says what is wrong with the settings, model or data a person gave
    (one line on stderr, no traceback). Its classes are imported here, on the error
    path, so that no command loads more than its own side to run."""
    from common.backbones import BackboneError
    from common.data.splits import DataFileError
    from common.federation_config import ConfigError

    return isinstance(exc, ConfigError | BackboneError | DataFileError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedshift`` console script.

    Parameters
    ----------
    argv : list[str] or None (default: None)
        The arguments after the program name; None: ``sys.argv[1:]``.

    Returns
    -------
    int
        The command's exit code; 2 when it stopped on a mistake in what it was
        given (said on stderr). Wrong arguments exit with argparse's code 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = argparse.ArgumentParser(prog="fedshift", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    module = None
    for name, command in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(command.module)
            getattr(module, command.add_parser)(sub)
        else:  # listed by name and summary only; its module is not loaded
            sub.add_parser(name, help=command.summary)
    args = parser.parse_args(argv)  # exits unless argv[0] named a command, now loaded
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return getattr(module, COMMANDS[args.command].run)(args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"fedshift: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
