"""What every scenario shares: the run's context (profile, scratch directories, printing) and a peak-RSS sampler."""

from __future__ import annotations

import asyncio
import math
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import procs
from bench.profiles import Profile
from bench.results import Run, Sample, Scenario


@dataclass
class Context:
    """What every scenario needs: the profile, a scratch directory, the run being filled, a printer."""

    profile: Profile
    root: pathlib.Path
    run: Run
    say: Callable[[str], None] = print
    _dirs: int = field(default=0)
    # The product revision when the last system started (see procs.product_revision()).
    revision: str = ""

    def workdir(self, name: str) -> pathlib.Path:
        """A fresh directory (cwd, logs, database) for one started system; notes the product revision too."""
        self.revision = procs.product_revision()
        self._dirs += 1
        path = self.root / f"{self._dirs:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def record(self, scenario: Scenario, sample: Sample) -> None:
        """Keep a sample and print it at once, so a collapse is visible while the run goes on."""
        # The machine is shared: the 1-minute load average says how much others were running meanwhile.
        sample.values["load_1m"] = round(os.getloadavg()[0], 2)
        if not sample.revision:
            sample.revision = self.revision
        scenario.samples.append(sample)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in sample.values.items())
        mark = "ok" if sample.validated else f"INVALID: {sample.validation}"
        self.say(f"  [{scenario.key}] repeat {sample.repeat + 1} {sample.system} @{sample.revision}: {shown} ({mark})")


def _short(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) >= 10:
        return str(int(value))
    return f"{value:.3g}"


class PeakRss:
    """Samples the RSS of some processes in the background; keeps the peak."""

    def __init__(self, pids: list[int], interval_seconds: float = 0.5) -> None:
        self.peak = 0
        self._pids = pids
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, procs.rss_bytes(self._pids))
            await asyncio.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._loop())
        return self

    def __exit__(self, *_: object) -> None:
        self.peak = max(self.peak, procs.rss_bytes(self._pids))
        if self._task is not None:
            self._task.cancel()
