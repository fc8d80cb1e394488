"""Two runs side by side: each goal's figure before and after a change (`python -m bench compare BEFORE [AFTER]`).

Only same-run ratios mean anything, so a goal stated as a ratio is compared ratio to
ratio, each taken against its own run's baseline; a goal on an absolute value (errors,
KB, ms) compares the values. Scenarios are matched by key.
"""

from __future__ import annotations

import math

from bench.results import Goal, Run, Scenario, goal_met, median, spread

VERDICT = {True: "met", False: "missed", None: "n/a"}
# Figures worth seeing before and after even without a goal on them (ratio to the same run's baseline).
CONTEXT_FIGURES = ("completed_per_s", "cpu_ms_per_discussion", "cpu_us_per_rpc", "p99_ms", "probe_p99_ms")


def _summary(values: list[float], suffix: str) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "–"
    low, high = spread(finite)
    middle = f"{median(finite):.3g}{suffix}"
    return middle if len(finite) == 1 else f"{middle} [{low:.3g}–{high:.3g}]"


def _subject(scenario: Scenario) -> str:
    for name in ("suite", "suite-sim"):
        if name in scenario.candidates:
            return name
    return scenario.baseline


def _figure_cell(scenario: Scenario, goal: Goal | None, figure: str) -> str:
    subject = _subject(scenario)
    by_ratio = goal is None or goal.ratio_at_least is not None or goal.ratio_at_most is not None
    if by_ratio and subject != scenario.baseline:
        cell = _summary(scenario.ratios(subject, figure), "×")
    else:
        cell = _summary(scenario.values(subject, figure), "")
    if goal is not None:
        cell += f" ({VERDICT[goal_met(scenario, goal, subject)]})"
    if not scenario.validated:
        cell += " (not all validated)"
    return cell


def comparison(before: Run, after: Run, before_label: str = "before", after_label: str = "after") -> list[str]:
    """Markdown table rows: scenario, goal or figure, before, after."""
    earlier = {s.key: s for s in before.scenarios if s.samples}
    lines = [f"| scenario | goal or figure | {before_label} | {after_label} |", "|---|---|---|---|"]
    for scenario in after.scenarios:
        old = earlier.get(scenario.key)
        if old is None or not scenario.samples:
            continue
        title = scenario.title.split(" (")[0]
        for goal in scenario.goals:
            old_goal = next((g for g in old.goals if g.figure == goal.figure and g.text == goal.text), goal)
            lines.append(
                f"| {title} | {goal.text} | {_figure_cell(old, old_goal, goal.figure)} | "
                f"{_figure_cell(scenario, goal, goal.figure)} |"
            )
        for figure in scenario.figures:
            if figure.key in CONTEXT_FIGURES and figure.key not in {g.figure for g in scenario.goals}:
                by_ratio = _subject(scenario) != scenario.baseline
                unit = f" {figure.unit}" if figure.unit else ""
                label = f"{figure.label}, ratio to {scenario.baseline}" if by_ratio else f"{figure.label}{unit}"
                lines.append(
                    f"| {title} | {label} | {_figure_cell(old, None, figure.key)} | "
                    f"{_figure_cell(scenario, None, figure.key)} |"
                )
    return lines
