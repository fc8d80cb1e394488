"""IdScope: each owner's ids map one-to-one onto store ids, differently for every owner and every secret."""

from __future__ import annotations

import secrets

import pytest

from services.session.ids import IdScope
from services.session.validation import DISCUSSION_ID


def test_store_ids_map_back_to_the_owners_ids() -> None:
    scope = IdScope(secrets.token_bytes(32))
    for _ in range(200):
        public_id = secrets.token_hex(16)
        store_id = scope.store_id("alice", public_id)
        assert DISCUSSION_ID.fullmatch(store_id)
        assert scope.public_id("alice", store_id) == public_id


def test_one_id_is_a_different_store_id_for_each_owner_and_secret() -> None:
    public_id = secrets.token_hex(16)
    scope, other_secret = IdScope(secrets.token_bytes(32)), IdScope(secrets.token_bytes(32))
    store_ids = {scope.store_id(owner, public_id) for owner in ("alice", "bob", "anonymous", "")}
    assert len(store_ids) == 4
    assert scope.store_id("alice", public_id) != other_secret.store_id("alice", public_id)
    assert IdScope(b"k" * 32).store_id("alice", public_id) == IdScope(b"k" * 32).store_id("alice", public_id)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        IdScope(b"short")
