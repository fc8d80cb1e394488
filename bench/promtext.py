"""Reads a service's Prometheus /metrics: the server-side counters that validate every run."""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name and labels."""

    samples: dict[tuple[str, Labels], float]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """The samples named `name` matching `labels`, summed per value of `label`."""
        wanted = set(labels.items())
        out: dict[str, float] = {}
        for (n, ls), v in self.samples.items():
            if n == name and wanted <= ls:
                key = dict(ls).get(label, "")
                out[key] = out.get(key, 0.0) + v
        return out


def histogram_quantile(before: Scrape, after: Scrape, name: str, quantile: float) -> float:
    """The quantile of what a histogram observed between two scrapes, as PromQL's histogram_quantile does it.

    Linear within the bucket it falls in; NaN when nothing was observed.
    """
    buckets: list[tuple[float, float]] = []
    for (sample, labels), value in after.samples.items():
        if sample != f"{name}_bucket":
            continue
        bound = float(dict(labels)["le"])
        buckets.append((bound, value - before.samples.get((sample, labels), 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return float("nan")


def scrape_sync(port: int, host: str = "127.0.0.1") -> Scrape:
    """Fetch and parse http://host:port/metrics."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples)


async def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    """scrape_sync off the event loop."""
    return await asyncio.to_thread(scrape_sync, port, host)


@dataclass(frozen=True)
class Handled:
    """RPCs one method completed, by gRPC code, between two scrapes."""

    ok: int
    not_ok: dict[str, int]
    msgs_sent: int

    @property
    def errors(self) -> int:
        """Completed with any code but OK."""
        return sum(self.not_ok.values())


def handled_between(before: Scrape, after: Scrape, method: str) -> Handled:
    """What the interceptor counted for `method` (e.g. GetDiscussion) between the scrapes."""
    codes_before = before.by_label("grpc_server_handled_total", "grpc_code", grpc_method=method)
    codes_after = after.by_label("grpc_server_handled_total", "grpc_code", grpc_method=method)
    delta = {code: int(codes_after[code] - codes_before.get(code, 0.0)) for code in codes_after}
    sent = after.total("grpc_server_msg_sent_total", grpc_method=method) - before.total(
        "grpc_server_msg_sent_total", grpc_method=method
    )
    return Handled(
        ok=delta.pop("OK", 0),
        not_ok={code: n for code, n in delta.items() if n},
        msgs_sent=int(sent),
    )
