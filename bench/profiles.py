"""How big a bench run is: the full run behind `make bench`, and the smoke run behind `make bench-smoke`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Repeats, durations and sizes of every scenario."""

    name: str
    repeats: int
    warmup_seconds: float
    duration_seconds: float
    unary_concurrency: tuple[int, ...]
    stream_concurrency: int
    burst_sizes: tuple[int, ...]
    burst_latency_seconds: float
    seed_burst: int
    sim_burst: int
    sim_answer_words: int
    hold_count: int
    hold_latency_seconds: float
    hold_repeats: int
    sim_hold_count: int
    sim_hold_latency_seconds: float
    soak_waves: int
    soak_wave_size: int
    ablation_burst: int
    # Longest a burst may take to finish before the run counts as failed.
    done_timeout_seconds: float
    # The real LLM path (bench.llm_path): answer lengths of the streamed-call scenario, its discussions
    # per repeat (4 calls each); then the realistic discussions' answer length, pace and counts.
    llm_call_answer_tokens: tuple[int, ...] = (16, 256)
    llm_call_discussions: int = 75
    llm_answer_tokens: int = 256
    llm_tokens_per_second: float = 50.0
    llm_discussions: int = 1_000
    llm_sdk_discussions: int = 200
    # The quota storm: discussions submitted evenly over the window, repeats of both systems.
    storm_discussions: int = 1_000
    storm_window_seconds: float = 60.0
    storm_repeats: int = 1


FULL = Profile(
    name="full",
    repeats=3,
    warmup_seconds=1.0,
    duration_seconds=5.0,
    unary_concurrency=(50, 400),
    stream_concurrency=50,
    burst_sizes=(1_000, 10_000),
    burst_latency_seconds=1.0,
    seed_burst=1_000,
    sim_burst=1_000,
    sim_answer_words=16,
    hold_count=10_000,
    # The issue says 60 s; accepting 10,000 creates takes the suite 40-60 s here, and the hold must be
    # complete before the first answers arrive, so the in-process LLM waits 90 s.
    hold_latency_seconds=90.0,
    hold_repeats=1,
    sim_hold_count=1_000,
    sim_hold_latency_seconds=60.0,
    soak_waves=10,
    soak_wave_size=2_000,
    ablation_burst=2_000,
    done_timeout_seconds=900.0,
)

SMOKE = Profile(
    name="smoke",
    repeats=1,
    warmup_seconds=0.5,
    duration_seconds=1.0,
    unary_concurrency=(50,),
    stream_concurrency=20,
    burst_sizes=(50,),
    burst_latency_seconds=0.2,
    seed_burst=20,
    sim_burst=20,
    sim_answer_words=8,
    hold_count=50,
    hold_latency_seconds=3.0,
    hold_repeats=1,
    sim_hold_count=20,
    sim_hold_latency_seconds=3.0,
    soak_waves=2,
    soak_wave_size=20,
    ablation_burst=30,
    done_timeout_seconds=60.0,
    llm_call_discussions=10,
    llm_answer_tokens=64,
    llm_tokens_per_second=200.0,
    llm_discussions=20,
    llm_sdk_discussions=10,
    storm_discussions=60,
    # The provider's bucket starts with a minute's quota: at a third of the demand, a window of 30 s or
    # less is served from it whole (no contention); 60 s leaves a third of the load to wait for the refill.
    storm_window_seconds=60.0,
)

# tests/bench/test_smoke.py: the smallest run that still exercises every code path of each scenario.
TINY = Profile(
    name="tiny",
    repeats=1,
    warmup_seconds=0.2,
    duration_seconds=0.5,
    unary_concurrency=(10,),
    stream_concurrency=5,
    burst_sizes=(10,),
    burst_latency_seconds=0.1,
    seed_burst=5,
    sim_burst=5,
    sim_answer_words=4,
    hold_count=10,
    hold_latency_seconds=1.5,
    hold_repeats=1,
    sim_hold_count=5,
    sim_hold_latency_seconds=1.5,
    soak_waves=2,
    soak_wave_size=5,
    ablation_burst=10,
    done_timeout_seconds=30.0,
    llm_call_answer_tokens=(16,),
    llm_call_discussions=3,
    llm_answer_tokens=16,
    llm_tokens_per_second=200.0,
    llm_discussions=5,
    llm_sdk_discussions=3,
    storm_discussions=12,
    storm_window_seconds=3.0,
)

PROFILES = {p.name: p for p in (FULL, SMOKE, TINY)}
