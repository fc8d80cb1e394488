"""The harness's arithmetic: a histogram's quantile between two scrapes, and the before/after table."""

from __future__ import annotations

import math

from bench.compare import comparison
from bench.promtext import Scrape, histogram_quantile
from bench.results import Figure, Goal, Run, Sample, Scenario


def _histogram(counts: dict[float, float]) -> Scrape:
    return Scrape({("lag_bucket", frozenset({("le", str(bound))})): count for bound, count in counts.items()})


def test_the_quantile_is_taken_over_what_was_observed_between_the_scrapes() -> None:
    inf = float("inf")
    # 1,000 fast observations before; in between, 90 under 1 ms, 9 in (1 ms, 10 ms], 1 in (10 ms, 100 ms].
    before = _histogram({0.001: 1000, 0.01: 1000, 0.1: 1000, inf: 1000})
    after = _histogram({0.001: 1090, 0.01: 1099, 0.1: 1100, inf: 1100})
    assert math.isclose(histogram_quantile(before, after, "lag", 0.5), 0.001 * 50 / 90)
    assert math.isclose(histogram_quantile(before, after, "lag", 0.99), 0.01)
    assert 0.01 < histogram_quantile(before, after, "lag", 0.995) < 0.1
    assert math.isnan(histogram_quantile(after, after, "lag", 0.99))  # nothing observed in between


def test_an_observation_past_the_last_bucket_reads_as_that_bucket_s_bound() -> None:
    inf = float("inf")
    before = _histogram({0.1: 0, inf: 0})
    after = _histogram({0.1: 0, inf: 3})
    assert histogram_quantile(before, after, "lag", 0.99) == 0.1


def _run(ratio: float, errors: float) -> Run:
    scenario = Scenario(
        key="burst",
        title="Burst (x)",
        baseline="minimal",
        candidates=["suite"],
        figures=[Figure("rate", "rate", "/s"), Figure("errors", "errors", "")],
        goals=[Goal("rate", "≥ 0.25×", ratio_at_least=0.25), Goal("errors", "0 errors", value_at_most=0)],
        samples=[
            Sample("minimal", 0, {"rate": 100.0, "errors": 0.0}, validated=True),
            Sample("suite", 0, {"rate": 100.0 * ratio, "errors": errors}, validated=True),
        ],
    )
    return Run(profile="full", started_at="t", machine={}, scenarios=[scenario])


def test_before_and_after_compare_ratios_to_each_run_s_own_baseline() -> None:
    rows = comparison(_run(0.1, 7), _run(0.3, 0))
    assert "| Burst | ≥ 0.25× | 0.1× (missed) | 0.3× (met) |" in rows
    assert "| Burst | 0 errors | 7 (missed) | 0 (met) |" in rows
