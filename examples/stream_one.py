"""One discussion, streamed live: each answer as it completes, then the summary and the final status.

    python examples/stream_one.py "Is a hot dog a sandwich?" --rounds 2

The server is ROUNDTABLE_ADDRESS (else 127.0.0.1:50051); ROUNDTABLE_API_KEY and ROUNDTABLE_TLS_CA_FILE as set.
"""

from __future__ import annotations

import argparse
import asyncio

from roundtable_client import (
    AgentCompleted,
    AgentFailed,
    Client,
    DiscussionStatus,
    StatusChanged,
    SummaryCompleted,
)


async def main() -> int:
    """Stream one discussion to its end; 0 when it completed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("topic", nargs="?", default="Is a hot dog a sandwich?")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--personas", nargs="*", default=[], help="default: the server's whole roster")
    args = parser.parse_args()

    final = DiscussionStatus.UNSPECIFIED
    async with Client() as client:
        async for event in client.discuss(args.topic, personas=args.personas, rounds=args.rounds):
            match event:
                case AgentCompleted(agent=agent, round=round_number, text=text):
                    print(f"[round {round_number}] {agent}: {text}\n")
                case AgentFailed(agent=agent, round=round_number, reason=reason):
                    print(f"[round {round_number}] {agent} failed: {reason}\n")
                case SummaryCompleted(agent=agent, text=text):
                    print(f"SUMMARY by {agent}: {text}\n")
                case StatusChanged(status=status, error=error):
                    final = status
                    print(f"status: {status.name}" + (f" ({error})" if error else ""))
    return 0 if final == DiscussionStatus.COMPLETED else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
