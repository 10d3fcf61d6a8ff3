"""`pagoda keys generate DIR`: a CURVE key pair per role, for ZeroMQ over tcp://.

DIR/public/<role>.key holds a role's public key: every process gets the whole folder.
DIR/secret/<role>.key_secret holds its secret key (and its public one): only that role's
processes get it (mode 0600, in a 0700 folder). docs/ARCHITECTURE.md, "Transport security".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from pagoda.cli.types import Subcommand
from protocol.curve import PUBLIC_SUFFIX, ROLES, SECRET_SUFFIX


def key_paths(directory: str, role: str) -> tuple[str, str]:
    """Where `role`'s public and secret key files go under `directory`."""
    return (os.path.join(directory, "public", role + PUBLIC_SUFFIX),
            os.path.join(directory, "secret", role + SECRET_SUFFIX))


def generate(directory: str, force: bool = False) -> list[str]:
    """Write every role's key pair under `directory`; the paths written. Raises
    FileExistsError, writing nothing, if a key is there already and not `force`."""
    import zmq.auth

    paths = [p for role in ROLES for p in key_paths(directory, role)]
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        raise FileExistsError(f"keys exist already ({', '.join(existing)}): --force replaces them")
    public_dir, secret_dir = os.path.join(directory, "public"), os.path.join(directory, "secret")
    os.makedirs(public_dir, exist_ok=True)
    os.makedirs(secret_dir, mode=0o700, exist_ok=True)
    os.chmod(secret_dir, 0o700)  # whatever the umask, or the folder's mode before
    # Made in a 0700 folder inside the secret one: no secret is readable by others, even for a moment.
    scratch = tempfile.mkdtemp(dir=secret_dir)
    try:
        for role in ROLES:
            made_public, made_secret = zmq.auth.create_certificates(scratch, role)
            public, secret = key_paths(directory, role)
            os.chmod(made_secret, 0o600)
            os.chmod(made_public, 0o644)
            os.replace(made_secret, secret)
            os.replace(made_public, public)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return paths


class KeysCommand(Subcommand):
    name = "keys"

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help="CURVE keys for ZeroMQ over tcp://")
        actions = parser.add_subparsers(dest="keys_action", required=True)
        gen = actions.add_parser(
            "generate",
            help="write a key pair per role (frontend, scheduler, tokenizer, worker)",
            description="Write DIR/public/<role>.key (public: every process gets the folder) and "
            "DIR/secret/<role>.key_secret (secret, mode 0600: only that role's processes get it).",
        )
        gen.add_argument("dir", metavar="DIR", help="the folder to write public/ and secret/ in")
        gen.add_argument("--force", action="store_true", help="replace keys that exist already")
        return parser

    def cmd(self, args: argparse.Namespace) -> int:
        try:
            paths = generate(args.dir, force=args.force)
        except (FileExistsError, OSError) as e:
            print(f"pagoda keys generate: {e}", file=sys.stderr)
            return 1
        root = os.path.abspath(args.dir)
        print(f"CURVE key pairs for {', '.join(ROLES)} in {root}:")
        for path in paths:
            kind = "secret, mode 0600" if path.endswith(SECRET_SUFFIX) else "public"
            print(f"  {os.path.abspath(path)}  ({kind})")
        public = os.path.join(root, "public")
        print("Flags (or PAGODA_CURVE_PUBLIC_KEYS_DIR / PAGODA_CURVE_SECRET_KEY_FILE) of each process:")
        for role in ROLES:
            print(f"  pagoda {role}: --curve-public-keys-dir {public} "
                  f"--curve-secret-key-file {key_paths(root, role)[1]}")
        print(f"  pagoda serve (every role on this host): --curve-public-keys-dir {public} "
              f"--curve-secret-key-file {os.path.join(root, 'secret')}")
        return 0


def cmd_init() -> list[Subcommand]:
    return [KeysCommand()]
