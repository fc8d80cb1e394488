"""Discussion ids scoped to their owner: what a caller names, and the store id that is unique across callers.

A caller sees and sends its discussion's id (minted by the server or proposed in
x-session-id); below the servicer — the store, admission, the runner, the agent
sets, the log files — the discussion is known by its store id, a keyed
permutation of (owner, id). Two principals naming the same id therefore hold two
discussions that never meet, and nothing either sees depends on the other's.
The permutation is a four-round Feistel network over the id's 16 bytes with
HMAC-SHA256 as its round function (Luby-Rackoff: a pseudorandom permutation), so
each owner's mapping is one-to-one and invertible (listings map back), and
without the store's secret nobody can choose an id that lands on another
owner's store id.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

ID_BYTES = 16
HALF_BYTES = ID_BYTES // 2
ROUNDS = 4
SECRET_BYTES = 32


class IdScope:
    """Maps (owner, caller-visible id) to the store id and back; ids are 32 lowercase hex characters."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the id secret must hold at least 16 bytes")
        self._secret = secret
        # Principals are few and the derivation is the costly part: remember each owner's key.
        self._owner_key = functools.lru_cache(maxsize=4096)(self._derive_owner_key)

    def store_id(self, owner: str, discussion_id: str) -> str:
        """The id the store, the runner and the agents know this owner's discussion by."""
        key = self._owner_key(owner)
        block = bytes.fromhex(discussion_id)
        left, right = block[:HALF_BYTES], block[HALF_BYTES:]
        for round_number in range(ROUNDS):
            left, right = right, _xor(left, _round(key, round_number, right))
        return (left + right).hex()

    def public_id(self, owner: str, store_id: str) -> str:
        """The id the owner knows a stored discussion by (the inverse of store_id)."""
        key = self._owner_key(owner)
        block = bytes.fromhex(store_id)
        left, right = block[:HALF_BYTES], block[HALF_BYTES:]
        for round_number in reversed(range(ROUNDS)):
            left, right = _xor(right, _round(key, round_number, left)), left
        return (left + right).hex()

    def _derive_owner_key(self, owner: str) -> bytes:
        return hmac.digest(self._secret, b"roundtable discussion ids\0" + owner.encode(), hashlib.sha256)


def _round(key: bytes, round_number: int, half: bytes) -> bytes:
    return hmac.digest(key, bytes((round_number,)) + half, hashlib.sha256)[:HALF_BYTES]


def _xor(first: bytes, second: bytes) -> bytes:
    return (int.from_bytes(first) ^ int.from_bytes(second)).to_bytes(HALF_BYTES)
