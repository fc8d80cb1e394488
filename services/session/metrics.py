"""The session service's domain metrics (roundtable_*): base units, never a session id or principal label."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

DISCUSSIONS_CREATED = Counter("roundtable_discussions_created_total", "Discussions accepted (running or queued).")
DISCUSSIONS_FINISHED = Counter(
    "roundtable_discussions_finished_total", "Discussions that reached a terminal status.", ["status"]
)
DISCUSSIONS_ACTIVE = Gauge("roundtable_discussions_active", "Discussions running on this session replica.")
DISCUSSIONS_QUEUED = Gauge("roundtable_discussions_queued", "Discussions waiting for a slot on this replica.")
DISCUSSION_CAPACITY = Gauge(
    "roundtable_discussions_capacity",
    "Discussions that may run at once: this replica's own slots (scope=replica), or the fleet-wide cap every "
    "replica sharing the admission in Redis reports alike (scope=fleet: take the max, not the sum).",
    ["scope"],
)
DISCUSSIONS_EXPIRED = Counter("roundtable_discussions_expired_total", "Discussions removed because they expired.")
ADMISSIONS_REJECTED = Counter(
    "roundtable_admissions_rejected_total", "Calls refused with RESOURCE_EXHAUSTED, by the limit reached.", ["limit"]
)
AGENT_RUNS_WAITING = Gauge(
    "roundtable_agent_runs_waiting",
    "Running discussions waiting for one of max_concurrent_agent_runs calls to the agent service.",
)
STREAM_SUBSCRIBERS = Gauge("roundtable_stream_subscribers", "StreamDiscussion calls open on this replica.")
LANE_RUNS_ENDED = Counter(
    "roundtable_lane_runs_ended_total",
    "Discussion runs on lanes to the agent service, by how this replica saw them end (the status the agent "
    "service reported; UNAVAILABLE also for a lane lost; CANCELLED for a run this replica stopped).",
    ["grpc_code"],
)
