"""The scenarios of issue 7 by name, and the loop that runs them; each scenario lives in a module of its own.

reads.py, bursts.py, holds.py, soak.py, ablation.py and llm_path.py: each runs baseline and candidate
back to back, repeat after repeat (A B A B …). Every repeat is printed as it finishes, and validated
by the server's own counts: a run whose counts disagree with what the client saw is marked invalid,
never silently averaged in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bench import llm_path
from bench.ablation import ablation
from bench.bursts import bursts, sim_bursts
from bench.context import Context
from bench.holds import holds
from bench.peers import peers
from bench.reads import reads
from bench.results import Scenario, median, spread
from bench.soak import soak

SCENARIOS: dict[str, Callable[[Context], object]] = {
    "reads": reads,
    "bursts": bursts,
    "sim-bursts": sim_bursts,
    "holds": holds,
    "sim-holds": lambda ctx: holds(ctx, llm="sim"),
    "soak": soak,
    "ablation": ablation,
    "llm_calls": llm_path.llm_calls,
    "llm_discussions": llm_path.llm_discussions,
    "quota_storm": llm_path.quota_storm,
    "peers": peers,
}


def summary_line(scenario: Scenario) -> str:
    """One line per candidate and figure: median, spread and ratio to the baseline, for the console."""
    parts = []
    for candidate in scenario.candidates or [scenario.baseline]:
        for figure in scenario.figures:
            values = scenario.values(candidate, figure.key)
            if not values:
                continue
            low, high = spread(values)
            text = f"{candidate} {figure.key} {median(values):.4g} [{low:.4g}–{high:.4g}]"
            if scenario.candidates:
                ratios = scenario.ratios(candidate, figure.key)
                if ratios:
                    rlow, rhigh = spread(ratios)
                    text += f" = {median(ratios):.3g}× [{rlow:.3g}–{rhigh:.3g}]"
            parts.append(text)
    return "\n".join(f"    {p}" for p in parts)


async def run_all(ctx: Context, names: list[str]) -> None:
    """Run the named scenarios in order; one that fails is reported and the rest still run."""
    for name in names:
        started = time.monotonic()
        ctx.say(f"== {name}")
        try:
            result = SCENARIOS[name](ctx)
            if asyncio.iscoroutine(result):
                await result
        except Exception as error:  # a broken scenario must not hide the others' results
            ctx.say(f"!! scenario {name} failed: {type(error).__name__}: {error}")
            ctx.run.scenarios.append(
                Scenario(key=name, title=f"{name} (failed)", baseline="", candidates=[], figures=[], notes=[str(error)])
            )
        ctx.say(f"== {name} took {time.monotonic() - started:.0f} s")
