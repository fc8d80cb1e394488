"""Many discussions at once from one caller: the client's retry policy gets every one through a busy server.

    python examples/many_at_once.py --count 100

A server with a per-principal cap (production: 20 running or queued) refuses the rest with
RESOURCE_EXHAUSTED and a RetryInfo delay. The client waits at least that long, plus a random share of
a window that doubles with each retry (full jitter), so the refused callers come back spread out
instead of all at once. Nothing here handles a refusal: the policy does.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from roundtable_client import Client, DiscussionStatus, Retry, StatusChanged


async def main() -> int:
    """Run `--count` discussions at once; 0 when every one completed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--personas", nargs="*", default=["scientist"])
    parser.add_argument("--timeout-seconds", type=float, default=300.0, help="deadline of each create, retries in")
    args = parser.parse_args()

    retries: list[Retry] = []
    started = time.monotonic()
    async with Client(timeout_seconds=args.timeout_seconds, on_retry=retries.append) as client:

        async def one(index: int) -> DiscussionStatus:
            final = DiscussionStatus.UNSPECIFIED
            async for event in client.discuss(f"Question #{index}: is {index} a lucky number?", personas=args.personas):
                if isinstance(event, StatusChanged):
                    final = event.status
            return final

        finals = await asyncio.gather(*(one(index) for index in range(args.count)))
    completed = sum(final == DiscussionStatus.COMPLETED for final in finals)
    waits = sorted(retry.delay_seconds for retry in retries)
    longest = f", the longest wait {waits[-1]:.1f} s" if waits else ""
    print(f"{completed} of {args.count} discussions completed in {time.monotonic() - started:.1f} s")
    print(f"{len(retries)} retries{longest}")
    return 0 if completed == args.count else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
