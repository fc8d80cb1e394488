"""Redis Store: the scale-out home of discussions, event logs (Redis Streams), owner and expiry indexes.

Key layout (P is the key prefix). Every Lua script touches keys of one hash slot
only, so the same code can run on a Redis Cluster:

    P:{d:<id>}               HASH  doc, owner, req, status, la, ex, member   one discussion
    P:{d:<id>}:events        STREAM  entry id "<sequence>-0", field e = DiscussionEvent
    P:{o:<owner>}:list       ZSET  score 0, member "<created ns, 20 digits>:<id>"  (newest first by lex)
    P:{o:<owner>}:status     HASH  id -> status                                  (listing filter)
    P:{o:<owner>}:expiry     ZSET  id -> expires_at seconds                      (owned())
    P:{o:<owner>}:requests   HASH  request_id -> id                              (idempotency)
    P:{idx}:expiry           ZSET  id -> expires_at seconds                      (the sweep)
    P:{idx}:unfinished       SET   ids QUEUED or RUNNING                         (restart)
    P:id-secret              STRING the key that scopes ids by owner               (services/session/ids.py)

Cross-slot updates run in one pipelined round trip (on a cluster, one per node at
once, and a further round trip where the order below needs one: execute_in_order),
in an order that leaves at worst an index entry without a document after a crash
mid-way: readers skip those,
and a discussion is always in the expiry index before its document exists, so the
sweep removes anything half-written. Index updates after creation are conditional
(ZADD XX, "only if still indexed"), so a save or touch racing a delete never
resurrects an entry. Times are stored as 20-digit nanosecond strings so the Lua
scripts compare them exactly (Lua numbers are doubles) and only ever move them forward.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.gen.roundtable.session.v1 import session_pb2
from services.session.document import UNFINISHED_STATUSES
from services.session.ids import SECRET_BYTES
from services.session.redis.connection import (
    Client,
    EncodableArg,
    Pipeline,
    Script,
    blocking_twin,
    execute_in_order,
    execute_pipeline,
    load_scripts,
    unavailable_on_failure,
)
from services.session.stores.interface import (
    Discussion,
    DiscussionEvent,
    DiscussionExists,
    DiscussionStatus,
    decode_page_token,
    encode_page_token,
    summary_view,
)

# Owners remembered per replica: an owner never changes, and knowing it saves a round trip per save.
OWNER_CACHE_SIZE = 50_000
# Longest a wait_for_events() call blocks inside Redis before answering "nothing yet".
MAX_BLOCK_SECONDS = 5.0
# Events per XADD script call: bounds how long one script holds Redis.
EVENTS_PER_SCRIPT = 500

# KEYS: doc. ARGV: doc, owner, request_id, status, last_accessed ns, expires ns, list member.
# Returns the owner of the stored document (a retried create finds its own write).
CREATE_DOC = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local held = redis.call('HMGET', KEYS[1], 'owner', 'req')
  return {0, held[1] or '', held[2] or ''}
end
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'owner', ARGV[2], 'req', ARGV[3], 'status', ARGV[4],
           'la', ARGV[5], 'ex', ARGV[6], 'member', ARGV[7])
return {1, ARGV[2], ARGV[3]}
"""
)

# KEYS: requests, list, status, owner expiry. ARGV: request_id, id, member, status, expires s, stale id.
# Claims the request id (unless another live discussion has it: returns that one) and indexes the discussion.
CLAIM = Script(
    """
if ARGV[1] ~= '' then
  local current = redis.call('HGET', KEYS[1], ARGV[1])
  if current and current ~= ARGV[2] and current ~= ARGV[6] then return current end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('ZADD', KEYS[2], 0, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[2])
return ARGV[2]
"""
)

# KEYS: doc. ARGV: last_accessed ns, expires ns, and for a save also doc, status.
# Times only move forward; a touch never rewrites the document, so it cannot undo a save.
UPDATE_DOC = Script(
    """
local current = redis.call('HMGET', KEYS[1], 'la', 'ex')
if not current[1] then return 0 end
local la, ex = ARGV[1], ARGV[2]
if current[1] > la then la = current[1] end
if current[2] > ex then ex = current[2] end
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], 'la', la, 'ex', ex, 'doc', ARGV[3], 'status', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'la', la, 'ex', ex)
end
return 1
"""
)

# KEYS: status, owner expiry. ARGV: id, status, expires s. Only for a discussion still indexed.
OWNER_UPDATE = Script(
    """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[1])
return 1
"""
)

# KEYS: expiry, unfinished. ARGV: id, expires s, '1' if unfinished. Only for a discussion still indexed.
GLOBAL_UPDATE = Script(
    """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) else redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
"""
)

# KEYS: doc, events. ARGV: (sequence, event) pairs in ascending sequence order.
# Appends after the stream's last entry; a sequence already present keeps its first event; one that
# arrives late (below the last entry) is merged in by rewriting the stream, since XADD only appends.
# Events of a discussion that no longer exists are dropped. Returns how many were added.
APPEND = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local top = 0
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then top = tonumber(string.match(last[1][1], '^(%d+)')) end
local added, late = 0, {}
for i = 1, #ARGV, 2 do
  local sequence = tonumber(ARGV[i])
  if sequence > top then
    redis.call('XADD', KEYS[2], ARGV[i] .. '-0', 'e', ARGV[i + 1])
    top = sequence
    added = added + 1
  elseif #redis.call('XRANGE', KEYS[2], ARGV[i] .. '-0', ARGV[i] .. '-0') == 0 then
    late[#late + 1] = {sequence, ARGV[i + 1]}
  end
end
if #late > 0 then
  local merged = late
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
    merged[#merged + 1] = {tonumber(string.match(entry[1], '^(%d+)')), entry[2][2]}
  end
  table.sort(merged, function(a, b) return a[1] < b[1] end)
  redis.call('DEL', KEYS[2])
  for _, entry in ipairs(merged) do
    redis.call('XADD', KEYS[2], string.format('%d-0', entry[1]), 'e', entry[2])
  end
  added = added + #late
end
return added
"""
)

# KEYS: list, status. ARGV: upper bound ('+' or '(' .. member), status filter or '', how many.
# Walks the owner's index newest first, keeping members whose status matches.
LIST = Script(
    """
local found, upper, wanted = {}, ARGV[1], tonumber(ARGV[3])
local chunk_size = wanted
if ARGV[2] ~= '' then chunk_size = 256 end
while #found < wanted do
  local chunk = redis.call('ZREVRANGEBYLEX', KEYS[1], upper, '-', 'LIMIT', 0, chunk_size)
  if #chunk == 0 then break end
  for _, member in ipairs(chunk) do
    if ARGV[2] == '' or redis.call('HGET', KEYS[2], string.sub(member, 22)) == ARGV[2] then
      found[#found + 1] = member
      if #found == wanted then break end
    end
  end
  upper = '(' .. chunk[#chunk]
end
return found
"""
)

# KEYS: doc, events. Returns {owner, request_id, member} of what it deleted, or false.
DELETE_DOC = Script(
    """
local found = redis.call('HMGET', KEYS[1], 'owner', 'req', 'member')
if not found[1] then return false end
redis.call('DEL', KEYS[1], KEYS[2])
return found
"""
)

# KEYS: requests, list, status, owner expiry. ARGV: id, request_id, member.
OWNER_FORGET = Script(
    """
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[1], ARGV[2]) end
return 1
"""
)

SCRIPTS = (CREATE_DOC, CLAIM, UPDATE_DOC, OWNER_UPDATE, GLOBAL_UPDATE, APPEND, LIST, DELETE_DOC, OWNER_FORGET)


class RedisStore:
    """Store on Redis: safe for many session replicas sharing one Redis (or one Redis Cluster)."""

    def __init__(self, client: Client, *, key_prefix: str = "rt") -> None:
        self._redis = client
        self._blocking: Client | None = None
        self._prefix = key_prefix
        self._owners: OrderedDict[str, str] = OrderedDict()

    @classmethod
    async def open(cls, client: Client, *, key_prefix: str = "rt") -> RedisStore:
        """A store on `client` (redis.connection.connect), scripts loaded; RedisUnavailable if Redis does not answer."""
        store = cls(client, key_prefix=key_prefix)
        with unavailable_on_failure("open"):
            await load_scripts(client, SCRIPTS)
        return store

    @property
    def client(self) -> Client:
        """The command client (shared with RedisAdmission and RedisRateLimiter)."""
        return self._redis

    # --- keys ------------------------------------------------------------------------------------------

    def _doc_key(self, discussion_id: str) -> str:
        return f"{self._prefix}:{{d:{discussion_id}}}"

    def _events_key(self, discussion_id: str) -> str:
        return f"{self._prefix}:{{d:{discussion_id}}}:events"

    def _owner_keys(self, owner: str) -> list[str]:
        """requests, list, status, expiry of one owner (one slot)."""
        base = f"{self._prefix}:{{o:{owner}}}"
        return [f"{base}:requests", f"{base}:list", f"{base}:status", f"{base}:expiry"]

    @property
    def _expiry_key(self) -> str:
        return f"{self._prefix}:{{idx}}:expiry"

    @property
    def _unfinished_key(self) -> str:
        return f"{self._prefix}:{{idx}}:unfinished"

    @property
    def _id_secret_key(self) -> str:
        return f"{self._prefix}:id-secret"

    # --- Store -----------------------------------------------------------------------------------------

    async def create(self, owner: str, discussion: Discussion) -> Discussion:
        """Insert, or return the owner's discussion with the same request_id (atomic claim in Redis)."""
        with unavailable_on_failure("create"):
            discussion_id = discussion.discussion_id
            member = _member(_nanos(discussion.created_at), discussion_id)
            expires = _seconds(discussion.expires_at)
            unfinished = discussion.status in UNFINISHED_STATUSES
            owner_keys = self._owner_keys(owner)
            claim_args: list[str | float] = [
                discussion.request_id,
                discussion_id,
                member,
                str(discussion.status),
                expires,
                "",
            ]

            def index(pipe: Pipeline) -> None:
                pipe.zadd(self._expiry_key, {discussion_id: expires}, nx=True)
                if unfinished:
                    pipe.sadd(self._unfinished_key, discussion_id)

            def write(pipe: Pipeline) -> None:
                CREATE_DOC.queue(
                    pipe,
                    [self._doc_key(discussion_id)],
                    [
                        discussion.SerializeToString(),
                        owner,
                        discussion.request_id,
                        str(discussion.status),
                        _fixed(_nanos(discussion.last_accessed_at)),
                        _fixed(_nanos(discussion.expires_at)),
                        member,
                    ],
                )

            # Expiry index first: whatever a crash leaves half-written, the sweep finds and removes.
            replies = await execute_in_order(self._redis, SCRIPTS, index, write)
            created, held_by, held_request_id = replies[-1]
            if not int(created):
                # The id is taken: a replay of the owner's own create, or refused. Never overwritten.
                replayed = await self._replay(owner, discussion, _text(held_by), _text(held_request_id))
                if replayed is None:
                    raise DiscussionExists(discussion_id)
                return replayed
            self._remember_owner(discussion_id, owner)
            # Indexed only once the document is known to be ours (a taken id's indexes stay untouched).
            # The claim runs only once the document is written, so a claimed id always has a
            # document unless it was deleted since; then the request id is free to take over.
            winner = _text(await CLAIM(self._redis, owner_keys, claim_args))
            for _ in range(10):
                if winner == discussion_id:
                    return _copy(discussion)
                found = await self.get(winner)
                if found is not None:
                    await self._discard_unclaimed(discussion_id)
                    return found
                claim_args[-1] = winner
                winner = _text(await CLAIM(self._redis, owner_keys, claim_args))
            raise RuntimeError(f"request_id {discussion.request_id!r} kept changing hands")

    async def _replay(
        self, owner: str, discussion: Discussion, held_by: str, held_request_id: str
    ) -> Discussion | None:
        """The owner's discussion a create with a taken id repeats (same request_id), or None."""
        if not discussion.request_id:
            return None
        candidates = [_text(await self._redis.hget(self._owner_keys(owner)[0], discussion.request_id) or b"")]
        if held_by == owner and held_request_id == discussion.request_id:
            candidates.append(discussion.discussion_id)  # its claim may still be on the way
        for candidate in candidates:
            if candidate and (found := await self.get_with_owner(candidate)) is not None and found[1] == owner:
                return found[0]
        return None

    async def id_secret(self) -> bytes:
        """The secret the first replica made (SET NX): every replica and restart reads the same one."""
        with unavailable_on_failure("id_secret"):
            await self._redis.set(self._id_secret_key, secrets.token_bytes(SECRET_BYTES), nx=True)
            secret = await self._redis.get(self._id_secret_key)
        if not isinstance(secret, bytes):
            raise RuntimeError(f"{self._id_secret_key} holds no secret")
        return secret

    async def _discard_unclaimed(self, discussion_id: str) -> None:
        """Remove a document written for a create that lost its request_id race (never indexed by owner)."""

        def discard(pipe: Pipeline) -> None:
            pipe.delete(self._doc_key(discussion_id))

        def unindex(pipe: Pipeline) -> None:
            pipe.zrem(self._expiry_key, discussion_id)
            pipe.srem(self._unfinished_key, discussion_id)

        # The document before its expiry entry: a crash between them leaves the entry, which the sweep clears.
        await execute_in_order(self._redis, SCRIPTS, discard, unindex)
        self._owners.pop(discussion_id, None)

    async def get(self, discussion_id: str) -> Discussion | None:
        """The document with its access and expiry times, or None."""
        found = await self._get_with_owner(discussion_id, "get")
        return None if found is None else found[0]

    async def get_with_owner(self, discussion_id: str) -> tuple[Discussion, str] | None:
        """The document and its owner (one HMGET), or None."""
        return await self._get_with_owner(discussion_id, "get_with_owner")

    async def _get_with_owner(self, discussion_id: str, operation: str) -> tuple[Discussion, str] | None:
        with unavailable_on_failure(operation):
            doc, last_accessed, expires, owner = await self._redis.hmget(
                self._doc_key(discussion_id), ["doc", "la", "ex", "owner"]
            )
        if doc is None:
            return None
        self._remember_owner(discussion_id, _text(owner))
        return _document(doc, last_accessed, expires), _text(owner)

    async def owner(self, discussion_id: str) -> str | None:
        """The owning principal."""
        with unavailable_on_failure("owner"):
            found = await self._redis.hget(self._doc_key(discussion_id), "owner")
        if found is None:
            return None
        self._remember_owner(discussion_id, _text(found))
        return _text(found)

    async def save(self, discussion: Discussion) -> None:
        """Replace the document if it still exists; access and expiry times only move forward."""
        with unavailable_on_failure("save"):
            discussion_id = discussion.discussion_id
            owner = await self._known_owner(discussion_id)
            if owner is None:
                return
            expires = _seconds(discussion.expires_at)
            unfinished = "1" if discussion.status in UNFINISHED_STATUSES else "0"

            def write(pipe: Pipeline) -> None:
                UPDATE_DOC.queue(
                    pipe,
                    [self._doc_key(discussion_id)],
                    [
                        _fixed(_nanos(discussion.last_accessed_at)),
                        _fixed(_nanos(discussion.expires_at)),
                        discussion.SerializeToString(),
                        str(discussion.status),
                    ],
                )
                owner_keys = self._owner_keys(owner)
                OWNER_UPDATE.queue(pipe, owner_keys[2:], [discussion_id, str(discussion.status), expires])
                GLOBAL_UPDATE.queue(
                    pipe, [self._expiry_key, self._unfinished_key], [discussion_id, expires, unfinished]
                )

            await execute_pipeline(self._redis, SCRIPTS, write)

    async def touch(self, discussion_id: str, last_accessed_at: float, expires_at: float) -> None:
        """New last-access and expiry times; never rewrites the document, so it cannot undo a save."""
        with unavailable_on_failure("touch"):
            owner = await self._known_owner(discussion_id)
            if owner is None:
                return

            def write(pipe: Pipeline) -> None:
                UPDATE_DOC.queue(
                    pipe,
                    [self._doc_key(discussion_id)],
                    [_fixed(int(last_accessed_at * 1e9)), _fixed(int(expires_at * 1e9))],
                )
                # XX: a touch racing a delete must not put the id back into an index.
                pipe.zadd(self._owner_keys(owner)[3], {discussion_id: expires_at}, xx=True, gt=True)
                pipe.zadd(self._expiry_key, {discussion_id: expires_at}, xx=True, gt=True)

            await execute_pipeline(self._redis, SCRIPTS, write)

    async def append_events(self, events: list[DiscussionEvent]) -> None:
        """Append events (one script per discussion, all in one round trip); sequences already present are ignored."""
        if not events:
            return
        by_discussion: dict[str, dict[int, bytes]] = {}
        for event in events:
            # The first write of a sequence number wins, within a batch as across batches.
            by_discussion.setdefault(event.discussion_id, {}).setdefault(event.sequence, event.SerializeToString())

        def write(pipe: Pipeline) -> None:
            for discussion_id, log in by_discussion.items():
                ordered = sorted(log.items())
                for start in range(0, len(ordered), EVENTS_PER_SCRIPT):
                    args: list[EncodableArg] = [
                        part for pair in ordered[start : start + EVENTS_PER_SCRIPT] for part in pair
                    ]
                    APPEND.queue(pipe, [self._doc_key(discussion_id), self._events_key(discussion_id)], args)

        with unavailable_on_failure("append_events"):
            await execute_pipeline(self._redis, SCRIPTS, write)

    async def events_after(self, discussion_id: str, after_sequence: int, limit: int) -> list[DiscussionEvent]:
        """Up to `limit` events with sequence > after_sequence, in order (XRANGE from stream id after+1)."""
        if limit <= 0:
            return []
        with unavailable_on_failure("events_after"):
            entries: Any = await self._redis.xrange(
                self._events_key(discussion_id), min=f"{max(after_sequence, 0) + 1}-0", count=limit
            )
        return [DiscussionEvent.FromString(fields[b"e"]) for _, fields in entries]

    async def last_sequence(self, discussion_id: str) -> int:
        """The highest sequence recorded (0 if none): where a replica adopting the discussion continues."""
        with unavailable_on_failure("last_sequence"):
            last: Any = await self._redis.xrevrange(self._events_key(discussion_id), count=1)
        return int(last[0][0].split(b"-", 1)[0]) if last else 0

    async def wait_for_events(self, discussion_id: str, after_sequence: int, timeout_seconds: float) -> bool:
        """Block (XREAD BLOCK, any replica) until an event past after_sequence exists; False after the timeout."""
        if self._blocking is None:
            self._blocking = blocking_twin(self._redis, MAX_BLOCK_SECONDS)
        block_ms = max(1, int(min(timeout_seconds, MAX_BLOCK_SECONDS) * 1000))
        with unavailable_on_failure("wait_for_events"):
            found = await self._blocking.xread(
                {self._events_key(discussion_id): f"{max(after_sequence, 0)}-0"}, count=1, block=block_ms
            )
        return bool(found)

    async def list_page(
        self, owner: str, status: DiscussionStatus, page_size: int, page_token: str
    ) -> tuple[list[Discussion], str]:
        """Newest first, keyset-paginated on the owner's index; the token format is the other stores'."""
        upper = "+"
        if page_token:
            created, discussion_id = decode_page_token(page_token)
            upper = "(" + _member(created, discussion_id)
        wanted_status = "" if status == session_pb2.DISCUSSION_STATUS_UNSPECIFIED else str(status)
        owner_keys = self._owner_keys(owner)
        with unavailable_on_failure("list_page"):
            members = [
                _text(m) for m in await LIST(self._redis, owner_keys[1:3], [upper, wanted_status, page_size + 1])
            ]
            page_members = members[:page_size]
            ids = [_split_member(m)[1] for m in page_members]

            def read(pipe: Pipeline) -> None:
                for discussion_id in ids:
                    pipe.hmget(self._doc_key(discussion_id), ["doc", "la", "ex"])

            rows = await execute_pipeline(self._redis, SCRIPTS, read) if ids else []
        # A document missing behind an index entry was deleted mid-way (or by a crash): skipped.
        page = [_document(*row) for row in rows if row[0] is not None]
        next_token = ""
        if len(members) > page_size:
            created, last_id = _split_member(page_members[-1])
            next_token = encode_page_token(created, last_id)
        return [summary_view(d) for d in page], next_token

    async def owned(self, owner: str) -> tuple[int, float | None]:
        """Count and earliest expiry of the owner's discussions (ZCARD and the lowest score, one round trip)."""
        owner_keys = self._owner_keys(owner)

        def read(pipe: Pipeline) -> None:
            pipe.zcard(owner_keys[1])
            pipe.zrange(owner_keys[3], 0, 0, withscores=True)

        with unavailable_on_failure("owned"):
            count, earliest = await execute_pipeline(self._redis, SCRIPTS, read)
        return int(count), float(earliest[0][1]) if earliest else None

    async def delete(self, discussion_id: str) -> bool:
        """Remove the discussion and its events atomically, then its index entries."""
        with unavailable_on_failure("delete"):

            def remove(pipe: Pipeline) -> None:
                DELETE_DOC.queue(pipe, [self._doc_key(discussion_id), self._events_key(discussion_id)], [])

            def unindex(pipe: Pipeline) -> None:
                pipe.zrem(self._expiry_key, discussion_id)
                pipe.srem(self._unfinished_key, discussion_id)

            # The document before its expiry entry: if the document's node fails, the entry stays for the sweep.
            found, _, _ = await execute_in_order(self._redis, SCRIPTS, remove, unindex)
            self._owners.pop(discussion_id, None)
            if not found:
                return False
            owner, request_id, member = (_text(v) for v in found)
            await OWNER_FORGET(self._redis, self._owner_keys(owner), [discussion_id, request_id, member])
            return True

    async def expired(self, now: float, limit: int) -> list[str]:
        """Ids whose expiry has passed (the lowest scores of the expiry index)."""
        with unavailable_on_failure("expired"):
            ids = await self._redis.zrangebyscore(self._expiry_key, "-inf", now, start=0, num=limit)
        return [_text(i) for i in ids]

    async def unfinished(self) -> list[Discussion]:
        """QUEUED or RUNNING discussions (of every replica sharing this Redis)."""
        with unavailable_on_failure("unfinished"):
            ids = [_text(i) async for i in self._redis.sscan_iter(self._unfinished_key, count=1000)]

            def read(pipe: Pipeline) -> None:
                for discussion_id in ids:
                    pipe.hmget(self._doc_key(discussion_id), ["doc", "la", "ex"])

            rows = await execute_pipeline(self._redis, SCRIPTS, read) if ids else []
        docs = [_document(*row) for row in rows if row[0] is not None]
        return [d for d in docs if d.status in UNFINISHED_STATUSES]

    async def close(self) -> None:
        """Close the client and its pools: the store owns them (admission and the rate limiter are done by then)."""
        await self._redis.aclose()
        if self._blocking is not None:
            await self._blocking.aclose()

    # --- helpers ---------------------------------------------------------------------------------------

    def _remember_owner(self, discussion_id: str, owner: str) -> None:
        self._owners[discussion_id] = owner
        self._owners.move_to_end(discussion_id)
        while len(self._owners) > OWNER_CACHE_SIZE:
            self._owners.popitem(last=False)

    async def _known_owner(self, discussion_id: str) -> str | None:
        """The owner from the cache, else from Redis (None: no such discussion)."""
        cached = self._owners.get(discussion_id)
        if cached is not None:
            return cached
        found = await self._redis.hget(self._doc_key(discussion_id), "owner")
        if found is None:
            return None
        self._remember_owner(discussion_id, _text(found))
        return _text(found)


def _nanos(stamp: Timestamp) -> int:
    return max(stamp.ToNanoseconds(), 0)


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def _fixed(nanos: int) -> str:
    """Nanoseconds as 20 digits: string order is numeric order, which the scripts rely on."""
    return f"{max(nanos, 0):020d}"


def _member(created_nanos: int, discussion_id: str) -> str:
    """Owner-index member: sorts by creation time, then id, exactly like (created_ns, id) tuples."""
    return f"{_fixed(created_nanos)}:{discussion_id}"


def _split_member(member: str) -> tuple[int, str]:
    created, discussion_id = member.split(":", 1)
    return int(created), discussion_id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _document(doc: Any, last_accessed: Any, expires: Any) -> Discussion:
    """The stored document with the access and expiry times from their own fields."""
    found = Discussion.FromString(doc)
    if last_accessed is not None:
        found.last_accessed_at.FromNanoseconds(int(last_accessed))
    if expires is not None:
        found.expires_at.FromNanoseconds(int(expires))
    return found


def _copy(discussion: Discussion) -> Discussion:
    copy = Discussion()
    copy.CopyFrom(discussion)
    return copy
