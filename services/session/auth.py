"""Who is calling: API keys sent as `authorization: Bearer <key>`, checked against stored hashes."""

from __future__ import annotations

import hashlib
import pathlib
import tomllib
from collections.abc import Iterable

from services.shared.errors import Unauthenticated

ANONYMOUS = "anonymous"


class KeysFileError(ValueError):
    """The API keys file is unreadable or malformed; the message names the file and the entry."""


def key_hash(key: str) -> str:
    """The stored form of a key: hex SHA-256 (keys are random 256-bit tokens, so no salt is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: pathlib.Path) -> dict[str, str]:
    """key hash → principal, from a TOML file of [[key]] tables with `principal` and `sha256`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise KeysFileError(f"{path}: {error}") from error
    entries = data.get("key", [])
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: [[key]] must be an array of tables")
    keys: dict[str, str] = {}
    for index, entry in enumerate(entries):
        principal = entry.get("principal") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(principal, str) or not principal.strip() or principal == ANONYMOUS:
            raise KeysFileError(f"{path}: key[{index}]: 'principal' must be a non-empty name other than {ANONYMOUS!r}")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeysFileError(f"{path}: key[{index}]: 'sha256' must be 64 lowercase hex characters")
        keys[digest] = principal
    return keys


class Authenticator:
    """Maps a call's metadata to the principal it acts for."""

    def __init__(self, keys: dict[str, str], allow_anonymous: bool) -> None:
        self._keys = keys
        self._allow_anonymous = allow_anonymous

    def principal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The caller's principal; raises Unauthenticated for a wrong key or a refused anonymous call."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            if self._allow_anonymous:
                return ANONYMOUS
            raise Unauthenticated("this server needs an API key: send metadata 'authorization: Bearer <key>'")
        text = header.decode(errors="replace") if isinstance(header, bytes) else header
        scheme, _, key = text.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization metadata must read 'Bearer <key>'")
        principal = self._keys.get(key_hash(key.strip()))
        if principal is None:
            raise Unauthenticated("the API key is not valid")
        return principal
