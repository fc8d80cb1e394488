"""Create API keys: `python -m services.session.keys NAME --file keys.toml` prints a key and stores its hash."""

from __future__ import annotations

import argparse
import pathlib
import secrets

from services.session.auth import key_hash, load_keys


def add_key(path: pathlib.Path, principal: str) -> str:
    """Append a new key's hash for `principal` to the keys file; returns the key (shown once, never stored)."""
    if path.exists():
        load_keys(path)  # refuse to append to a file that is already broken
    key = "rt_" + secrets.token_urlsafe(32)
    with path.open("a", encoding="utf-8") as keys_file:
        keys_file.write(f'\n[[key]]\nprincipal = "{principal}"\nsha256 = "{key_hash(key)}"\n')
    return key


def main() -> None:
    """Command line: add a key for a principal."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("principal", help="who the key acts for, e.g. alice or team-research")
    parser.add_argument("--file", type=pathlib.Path, default=pathlib.Path("var/api_keys.toml"))
    args = parser.parse_args()
    if not args.principal.replace("-", "").replace("_", "").replace(".", "").isalnum():
        parser.error("principal may hold letters, digits, '-', '_' and '.' only")
    args.file.parent.mkdir(parents=True, exist_ok=True)
    print(add_key(args.file, args.principal))


if __name__ == "__main__":
    main()
