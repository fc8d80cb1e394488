"""h2load as a gRPC load generator: a pre-encoded length-prefixed protobuf body, application/grpc, te: trailers.

h2load counts every HTTP 200 as a success, and a gRPC error is an HTTP 200 too, so
its own counts prove nothing: the caller validates each run by server-side counters
and by reply bytes (an error reply is trailers-only and carries no DATA).
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import shutil
from dataclasses import dataclass

DEBIAN_PACKAGE = "nghttp2-client"


def available() -> bool:
    """Whether the h2load binary is on PATH."""
    return shutil.which("h2load") is not None


@dataclass(frozen=True)
class H2loadResult:
    """What one h2load run measured (after its warm-up)."""

    requests_per_second: float
    succeeded: int
    failed: int
    errored: int
    timeout: int
    # DATA bytes received over warm-up and measured phase alike (h2load's "traffic ... data").
    data_bytes: int
    latencies_ms: list[float]
    output: str

    def percentile_ms(self, q: float) -> float:
        """The q-quantile (0..1) of request latency, nearest rank."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


_FINISHED = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_DATA = re.compile(r"\((\d+)\) data")


async def run(
    url: str,
    body_path: pathlib.Path,
    *,
    clients: int,
    streams_per_client: int,
    warmup_seconds: float,
    duration_seconds: float,
    log_path: pathlib.Path,
) -> H2loadResult:
    """Run h2load against one gRPC method URL for warm-up + duration; parse its summary and request log."""
    log_path.unlink(missing_ok=True)  # noqa: ASYNC240 - a local file, before the run
    command = [
        "h2load",
        "--clients", str(clients),
        "--max-concurrent-streams", str(streams_per_client),
        "--threads", "1",
        "--duration", f"{round(duration_seconds * 1000)}ms",
        "--warm-up-time", f"{round(warmup_seconds * 1000)}ms",
        "--data", str(body_path),
        "--header", "content-type: application/grpc",
        "--header", "te: trailers",
        "--log-file", str(log_path),
        url,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    stdout, _ = await process.communicate()
    output = stdout.decode(errors="replace")
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    data = _DATA.search(output)
    if process.returncode != 0 or finished is None or requests is None or data is None:
        raise RuntimeError(f"h2load failed (exit {process.returncode}):\n{output}")
    return H2loadResult(
        requests_per_second=float(finished.group(1)),
        succeeded=int(requests.group(4)),
        failed=int(requests.group(5)),
        errored=int(requests.group(6)),
        timeout=int(requests.group(7)),
        data_bytes=int(data.group(1)),
        latencies_ms=_latencies(log_path),
        output=output,
    )


def _latencies(log_path: pathlib.Path) -> list[float]:
    """Per-request latencies (ms) from h2load's log, which holds the measured phase only (no warm-up)."""
    latencies: list[float] = []
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":
                latencies.append(int(parts[2]) / 1000)
    return latencies
