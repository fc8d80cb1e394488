"""The floor for a streamed LLM call: a bare aiohttp client reading the SSE lines with `json`, nothing else.

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

PROMPT = [
    {"role": "system", "content": "You are 科学家, a scientist. Answer in plain prose."},
    {"role": "user", "content": "Topic: Should cities ban cars from their centres?\nGive your analysis."},
]


async def one_call(session: aiohttp.ClientSession, url: str, max_tokens: int) -> int:
    """One streamed completion; the number of content chunks it carried."""
    body = {"model": "bench", "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    chunks = 0
    parts: list[str] = []
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            payload = json.loads(data)
            choices = payload.get("choices")
            if choices and (text := choices[0]["delta"].get("content")):
                parts.append(text)
                chunks += 1
    # The answer is assembled, as any client must, then dropped.
    return chunks if "".join(parts) or not chunks else 0


async def run(url: str, calls: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    """Make the calls; CPU seconds and chunks read."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def bounded() -> int:
            async with slots:
                return await one_call(session, url, max_tokens)

        # One call first so connection set-up and imports are not counted.
        await one_call(session, url, max_tokens)
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
