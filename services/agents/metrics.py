"""The agent service's domain metrics (roundtable_llm_*, roundtable_agent_*): base units, never a session label.

Label values come only from the fixed sets below, never from a session id, topic, principal or persona,
so the number of series stays the same however many discussions run. Each labelled child is resolved
here once, which also exports it (at 0) before its first event.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# An LLM call takes from a few tens of milliseconds (a cached answer) to --llm-timeout-seconds (120 s).
LLM_REQUEST_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)

LLM_REQUEST_SECONDS = Histogram(
    "roundtable_llm_request_seconds",
    "Time of one LLM call from when it holds an outbound slot to its last chunk, retries included, by outcome.",
    ["outcome"],
    buckets=LLM_REQUEST_BUCKETS_SECONDS,
)
LLM_REQUEST_OK = LLM_REQUEST_SECONDS.labels(outcome="ok")
LLM_REQUEST_ERROR = LLM_REQUEST_SECONDS.labels(outcome="error")
LLM_REQUEST_TIMEOUT = LLM_REQUEST_SECONDS.labels(outcome="timeout")
LLM_REQUEST_CANCELLED = LLM_REQUEST_SECONDS.labels(outcome="cancelled")

LLM_TOKENS = Counter(
    "roundtable_llm_tokens_total",
    "Tokens of LLM calls as the provider reports them (estimated where it reports none), by direction.",
    ["direction"],
)
LLM_PROMPT_TOKENS = LLM_TOKENS.labels(direction="prompt")
LLM_COMPLETION_TOKENS = LLM_TOKENS.labels(direction="completion")

LLM_RETRIES = Counter(
    "roundtable_llm_retries_total",
    "LLM HTTP requests sent again (by either client) after a 408/409/429/5xx, a timeout or a connection error.",
)
LLM_RATE_LIMITED = Counter(
    "roundtable_llm_rate_limited_total", "HTTP 429 answers received from LLM providers (each pauses the backend)."
)
LLM_MALFORMED_LINES = Counter(
    "roundtable_llm_malformed_lines_total",
    "SSE data lines from LLM providers that were not a chat-completion chunk, skipped by the streaming client.",
)
LLM_CALLS_IN_FLIGHT = Gauge("roundtable_llm_calls_in_flight", "LLM calls holding an outbound slot on this replica.")
LLM_CALLS_WAITING = Gauge(
    "roundtable_llm_calls_waiting", "LLM calls waiting for an outbound slot (--max-concurrent-llm-calls)."
)

AGENT_RUNS = Counter(
    "roundtable_agent_runs_total",
    "Agent answers (one per agent per round, the moderator's summary included), by outcome.",
    ["outcome"],
)
AGENT_RUNS_COMPLETED = AGENT_RUNS.labels(outcome="completed")
AGENT_RUNS_FAILED = AGENT_RUNS.labels(outcome="failed")
AGENT_RUNS_CANCELLED = AGENT_RUNS.labels(outcome="cancelled")

AGENT_SETS_CREATED = Counter("roundtable_agent_sets_created_total", "Per-session agent sets created on this replica.")
AGENT_SETS_RELEASED = Counter(
    "roundtable_agent_sets_released_total", "Per-session agent sets dropped (released, expired or evicted)."
)

# --- The fleet LLM budget (services/agents/llm_budget.py) ---------------------------------------------
# `backend` is the configured display name of a provider key (a few per deployment), never a principal.

LLM_BUDGET_REMAINING_TOKENS = Gauge(
    "roundtable_llm_budget_remaining_tokens",
    "Tokens left in the backend's per-minute bucket, as this replica last saw it (shared by the fleet).",
    ["backend"],
)
LLM_BUDGET_REMAINING_REQUESTS = Gauge(
    "roundtable_llm_budget_remaining_requests",
    "Requests left in the backend's per-minute bucket, as this replica last saw it (shared by the fleet).",
    ["backend"],
)
LLM_BUDGET_RESERVED_TOKENS = Gauge(
    "roundtable_llm_budget_reserved_tokens",
    "Tokens reserved by this replica's LLM calls in flight, not yet settled to real usage.",
    ["backend"],
)
LLM_BUDGET_WAITING_CALLS = Gauge(
    "roundtable_llm_budget_waiting_calls", "LLM calls on this replica queued for room in the budget.", ["backend"]
)
# Unlabelled so it is exported (at 0) before the first call: RoundtableLLMBudgetWaits reads it.
LLM_BUDGET_WAIT_SECONDS = Histogram(
    "roundtable_llm_budget_wait_seconds",
    "Time an LLM call waited for room in the budget, granted or not (0 when there was room at once).",
    buckets=(0.005, 0.05, 0.25, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
LLM_BUDGET_COOLDOWNS = Counter(
    "roundtable_llm_budget_cooldowns_total",
    "Provider 429s that paused every call to the backend, fleet-wide, for their Retry-After.",
    ["backend"],
)
LLM_BUDGET_STORE_ERRORS = Counter(
    "roundtable_llm_budget_store_errors_total",
    "Budget operations the shared store (Redis) failed; the budget then fails open or closed per its policy.",
    ["backend"],
)

AGENT_LANES_OPEN = Gauge(
    "roundtable_agent_lanes_open", "RunLane streams open on this replica (each carries many sessions' runs)."
)
AGENT_LANE_RUNS = Gauge("roundtable_agent_lane_runs", "Discussion runs in progress on this replica's lanes.")
AGENT_LANE_EVENTS_PER_MESSAGE = Histogram(
    "roundtable_agent_lane_events_per_message",
    "Events batched into one RunLane response message.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
AGENT_LANE_RUNS_ENDED = Counter(
    "roundtable_agent_lane_runs_ended_total",
    "Discussion runs on lanes that ended, by status (CANCELLED: stopped by the session service or with their lane).",
    ["grpc_code"],
)
