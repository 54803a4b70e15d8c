"""`turnout keys`: make and package the fleet's CURVE keys (see `common.fleet_keys`).

    turnout keys generate DIR [--force] [--secret NAME] [--namespace NS]
        a fresh fleet key pair in DIR, plus DIR/secret.yaml: the same files as a Kubernetes
        Secret (mount it as the keys directory, TURNOUT_KEYS_DIR, with defaultMode 0400)
    turnout keys secret DIR [--secret NAME] [--namespace NS]
        print that Secret for an existing keys directory
    turnout keys show DIR
        the fleet public key and the allow-list, after the checks every process makes
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.fleet_keys import KeysError, generate, load, secret_manifest

MANIFEST = "secret.yaml"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="turnout keys", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write a fresh fleet key pair and its Secret")
    gen.add_argument("dir", type=Path)
    gen.add_argument("--force", action="store_true", help="replace an existing key pair")
    secret = commands.add_parser("secret", help="print the keys directory as a Kubernetes Secret")
    secret.add_argument("dir", type=Path)
    for sub in (gen, secret):
        sub.add_argument("--secret", default="turnout-fleet-keys", help="the Secret's name")
        sub.add_argument("--namespace", default="", help="the Secret's namespace")
    show = commands.add_parser("show", help="the fleet public key and the allow-list")
    show.add_argument("dir", type=Path)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "generate":
            generate(args.dir, force=args.force)
            manifest = args.dir / MANIFEST
            # The manifest carries the secret too: owner-only, like the secret file.
            fd = os.open(manifest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secret_manifest(args.dir, args.secret, args.namespace))
            keys = load(args.dir)
            print(f"fleet key pair written to {args.dir} (public key {keys.public_text})")
            print(f"Kubernetes Secret {args.secret!r}: {manifest} (kubectl apply -f it)")
            print(f"start every process with --keys-dir {args.dir} (or TURNOUT_KEYS_DIR)")
        elif args.command == "secret":
            sys.stdout.write(secret_manifest(args.dir, args.secret, args.namespace))
        else:
            keys = load(args.dir)
            print(f"fleet public key: {keys.public_text}")
            for key in sorted(keys.allowed):
                print(f"admitted: {key.decode('ascii')}")
    except (KeysError, OSError) as exc:
        print(f"turnout keys: error: {exc}", file=sys.stderr)
        sys.exit(2)
