"""Results: every repeat of every system, and the medians, spreads and same-run ratios made from them."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Sample:
    """One repeat of one system in one scenario: its figures and whether the server confirmed the run."""

    system: str
    repeat: int
    values: dict[str, float]
    validated: bool
    validation: str = ""
    # The product code the sample ran (procs.product_revision()): HEAD plus a digest of local changes.
    revision: str = ""


@dataclass(frozen=True)
class Figure:
    """A figure a scenario reports: key in Sample.values, label, unit, and which way is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    digits: int = 0


@dataclass(frozen=True)
class Goal:
    """A goal from issue 7 on one figure's ratio (candidate / baseline) or absolute value."""

    figure: str
    text: str
    ratio_at_least: float | None = None
    ratio_at_most: float | None = None
    value_at_most: float | None = None
    value_at_least: float | None = None


@dataclass
class Scenario:
    """One scenario: a baseline, candidates, the figures they are compared on, and every sample."""

    key: str
    title: str
    baseline: str
    candidates: list[str]
    figures: list[Figure]
    goals: list[Goal] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def values(self, system: str, key: str) -> list[float]:
        """The figure across repeats, in repeat order."""
        return [s.values[key] for s in self.samples if s.system == system and key in s.values]

    def ratios(self, system: str, key: str) -> list[float]:
        """Per-repeat ratio to the baseline's repeat of the same index (they ran back to back)."""
        base = {s.repeat: s.values.get(key) for s in self.samples if s.system == self.baseline}
        out: list[float] = []
        for s in self.samples:
            if s.system != system or key not in s.values:
                continue
            reference = base.get(s.repeat)
            if reference is None:
                # Systems run on another schedule (fewer repeats) are compared with the baseline's median.
                reference = median(self.values(self.baseline, key))
            if reference and not math.isnan(reference):
                out.append(s.values[key] / reference)
        return out

    @property
    def validated(self) -> bool:
        """Whether every sample was confirmed by the server's own counters."""
        return bool(self.samples) and all(s.validated for s in self.samples)

    @property
    def revisions(self) -> list[str]:
        """The product revisions the samples ran, in order of first appearance."""
        return list(dict.fromkeys(s.revision for s in self.samples if s.revision))


def median(values: list[float]) -> float:
    """The median, NaN for no values."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def spread(values: list[float]) -> tuple[float, float]:
    """The smallest and largest value."""
    finite = [v for v in values if not math.isnan(v)]
    return (min(finite), max(finite)) if finite else (float("nan"), float("nan"))


def goal_met(scenario: Scenario, goal: Goal, system: str) -> bool | None:
    """Whether the median meets the goal; None when the goal cannot be judged (no data)."""
    if goal.ratio_at_least is not None or goal.ratio_at_most is not None:
        value = median(scenario.ratios(system, goal.figure))
    else:
        value = median(scenario.values(system, goal.figure))
    if math.isnan(value):
        return None
    checks = [
        goal.ratio_at_least is None or value >= goal.ratio_at_least,
        goal.ratio_at_most is None or value <= goal.ratio_at_most,
        goal.value_at_most is None or value <= goal.value_at_most,
        goal.value_at_least is None or value >= goal.value_at_least,
    ]
    return all(checks)


@dataclass
class Run:
    """A whole bench run: the machine, the profile and every scenario."""

    profile: str
    started_at: str
    machine: dict[str, str]
    scenarios: list[Scenario] = field(default_factory=list)
    series: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    hotspots: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """Everything, for the record and for re-rendering the report."""
        return json.dumps(asdict(self), indent=1, ensure_ascii=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> Run:
        """Inverse of to_json()."""
        data = json.loads(text)
        scenarios = []
        for raw in data.pop("scenarios"):
            raw["samples"] = [Sample(**s) for s in raw["samples"]]
            raw["figures"] = [Figure(**f) for f in raw["figures"]]
            raw["goals"] = [Goal(**g) for g in raw["goals"]]
            scenarios.append(Scenario(**raw))
        return cls(scenarios=scenarios, **data)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
