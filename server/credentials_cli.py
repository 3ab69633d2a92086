"""``fedshift credentials``: development TLS certificates and SuperNode key pairs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.dev_credentials import CredentialsExistError, make_credentials


def add_credentials_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``credentials`` subcommand on the ``fedshift`` parser's subparsers."""
    p = sub.add_parser(
        "credentials",
        description="Write a self-signed CA, a SuperLink TLS certificate signed by it and an "
                    "EC P-384 key pair per site into DIR. For trying fedshift out: in "
                    "production, certificates come from the hospital's own PKI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dir", type=Path, help="directory for the files")
    p.add_argument("--site", action="append", default=[], dest="sites", metavar="NAME",
                   help="a site to make a key pair for (repeat for each site)")
    p.add_argument("--host", action="append", default=[], dest="hosts", metavar="HOST",
                   help="a host name or IP address the SuperLink is reached at, besides "
                        "localhost (repeat for each)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)


def run_credentials(args: argparse.Namespace) -> int:
    """Write the credentials and print where each went; 2, saying why, when a file it
    would write is already there (it is kept)."""
    try:
        creds = make_credentials(args.dir, args.sites, args.hosts, args.days)
    except CredentialsExistError as exc:
        print(f"fedshift: error: {exc}", file=sys.stderr)
        return 2
    print(f"CA certificate (give to every site):   {creds.ca_certificate}")
    print(f"SuperLink certificate and key:         {creds.server_certificate}, "
          f"{creds.server_key}")
    for site, (private, public) in creds.site_keys.items():
        print(f"{site}: private key (stays at the site) {private}; "
              f"public key (register at the SuperLink) {public}")
    return 0
