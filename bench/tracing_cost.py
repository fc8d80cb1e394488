"""CPU per discussion of the three services with tracing off, and on at 100 % and 1 % sampling.

The services run as processes (bench/suite.py, the simulator as the LLM) exporting over OTLP/gRPC to
a receiver this script serves, so the cost counted includes building, batching and sending the spans.
Usage: python -m bench.tracing_cost [--discussions 200] [--concurrency 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import tempfile
import time

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench import procs
from bench.suite import start_suite
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc

# The batch processor exports every this many ms; the measurement waits past it so the export is counted.
EXPORT_DELAY_MS = 1000
MODES: dict[str, dict[str, str]] = {
    "off": {},
    "on, 100 %": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"},
    "on, 1 %": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    # Every span still made (none recorded): what tracing costs before a single span is exported.
    "on, 0 %": {"OTEL_TRACES_SAMPLER": "always_off"},
}


class CountingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's TraceService, counting the spans it gets."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Count the request's spans."""
        self.spans += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def _discussion(stub: session_pb2_grpc.SessionServiceAsyncStub, number: int) -> None:
    created = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(topic=f"Tracing cost, topic {number}", rounds=1), timeout=60
    )
    request = session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id)
    async for _ in stub.StreamDiscussion(request, timeout=120):
        pass


async def measure(mode: str, endpoint: str, receiver: CountingReceiver, discussions: int, concurrency: int) -> float:
    """CPU seconds per discussion of the services in this mode (one fresh suite)."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        os.environ.pop(name)
    if mode != "off":
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": str(EXPORT_DELAY_MS)})
        os.environ.update(MODES[mode])
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tracing-cost-"))
    suite = await start_suite(workdir, llm="sim", latency_seconds=0.05, variant=None)
    try:
        async with grpc.aio.insecure_channel(suite.session.address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            await _discussion(stub, -1)  # warm-up: imports, connections, caches
            await asyncio.sleep(EXPORT_DELAY_MS / 1000 * 2)
            spans_before = receiver.spans
            cpu_before = procs.cpu_seconds(suite.pids)
            gate = asyncio.Semaphore(concurrency)

            async def one(number: int) -> None:
                async with gate:
                    await _discussion(stub, number)

            started = time.monotonic()
            await asyncio.gather(*(one(n) for n in range(discussions)))
            elapsed = time.monotonic() - started
            await asyncio.sleep(EXPORT_DELAY_MS / 1000 * 2)  # the last batch is exported, and counted
            cpu = procs.cpu_seconds(suite.pids) - cpu_before
    finally:
        await suite.stop()
    per_discussion_ms = cpu / discussions * 1000
    print(
        f"{mode:>10}: {per_discussion_ms:6.2f} ms CPU/discussion ({cpu:.2f} s for {discussions} in {elapsed:.1f} s), "
        f"{receiver.spans - spans_before} spans received",
        flush=True,
    )
    return per_discussion_ms


async def main() -> None:
    """Run each mode `repeats` times, interleaved, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--discussions", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="off,on 100,on 1", help="comma-separated: off, on 100, on 1, on 0")
    args = parser.parse_args()
    modes = [f"{name.strip()} %" if name.strip() != "off" else "off" for name in args.modes.split(",")]
    modes = [mode.replace("on ", "on, ") for mode in modes]
    procs.pin_self()
    receiver = CountingReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        for _ in range(args.repeats):
            for mode in modes:
                endpoint = f"http://127.0.0.1:{port}"
                results[mode].append(await measure(mode, endpoint, receiver, args.discussions, args.concurrency))
    finally:
        await server.stop(0)
    off = sorted(results["off"])[len(results["off"]) // 2] if results.get("off") else float("nan")
    least_off = min(results["off"]) if results.get("off") else float("nan")
    for mode, values in results.items():
        median = sorted(values)[len(values) // 2]
        # The least is the run other work on the machine disturbed least.
        print(
            f"median {mode:>10}: {median:6.2f} ms CPU/discussion ({(median / off - 1) * 100:+.1f} % vs off); "
            f"least {min(values):6.2f} ms ({(min(values) / least_off - 1) * 100:+.1f} % vs off)"
        )


if __name__ == "__main__":
    asyncio.run(main())
