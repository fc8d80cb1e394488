"""The floor for a streamed LLM call, in a process of its own: bench.llm_clients' bare aiohttp + json reader.

`python -m bench.bare_reader --url URL --calls N --concurrency C --max-tokens T` makes N streamed chat
completions, C at a time, and prints one JSON line with the CPU it spent (this process only) and the
chunks it read. It does what any client must (POST, split lines, decode each `data:` line, keep the
text) and nothing a product adds (retries, budgets, metrics, events), so the agent service's cost per
call is read against it in the same run (bench.llm_path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

import aiohttp

from bench.llm_clients import bare_readline_json


async def run(url: str, calls: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    """Make the calls; CPU seconds and chunks read."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        one_call = bare_readline_json(session, url, max_tokens)

        async def bounded() -> int:
            async with slots:
                return await one_call()

        # One call first so connection set-up and imports are not counted.
        await one_call()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_before = usage.ru_utime + usage.ru_stime
        started = time.monotonic()
        chunks = sum(await asyncio.gather(*(bounded() for _ in range(calls))))
        usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "calls": calls,
        "chunks": chunks,
        "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
        "wall_seconds": time.monotonic() - started,
    }


def main() -> None:
    """Command line: print one JSON line of results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", required=True, help="the chat completions URL, e.g. http://127.0.0.1:50060/v1/chat/completions"
    )
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    result = asyncio.run(run(args.url, args.calls, args.concurrency, args.max_tokens))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
