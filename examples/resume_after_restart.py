"""Follow a discussion across a restart of this program: keep the last sequence seen, start again from it.

    python examples/resume_after_restart.py --state var/follow.json --stop-after 5   # starts one, stops early
    python examples/resume_after_restart.py --state var/follow.json                  # picks up where it stopped

Within one run, client.events() already survives dropped connections and lost server replicas by
itself. Across runs, the program keeps what it needs to do the same: the discussion id and the
sequence of the last event it handled, and passes them back as events(id, after_sequence=…).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib

from roundtable_client import AgentCompleted, Client, StatusChanged, SummaryCompleted


async def main() -> int:
    """Start (or resume) following one discussion; 0 once its end was seen."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=pathlib.Path, required=True, help="where the progress is kept")
    parser.add_argument("--topic", default="Should cities ban cars from their centres?")
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many events (a pretend crash)")
    args = parser.parse_args()

    async with Client() as client:
        if args.state.exists():
            state = json.loads(args.state.read_text())
            print(f"resuming {state['discussion_id']} after sequence {state['last_sequence']}")
        else:
            created = await client.create(args.topic, personas=["scientist", "economist"], rounds=2)
            state = {"discussion_id": created.discussion_id, "last_sequence": 0}
            print(f"started {created.discussion_id}")
        handled = 0
        async for event in client.events(state["discussion_id"], after_sequence=state["last_sequence"]):
            if isinstance(event, AgentCompleted | SummaryCompleted):
                print(f"#{event.sequence} {event.agent}: {event.text[:60]}")
            elif isinstance(event, StatusChanged):
                print(f"#{event.sequence} status {event.status.name}")
            # Saved after handling: a crash in between handles this event again, never skips one.
            state["last_sequence"] = event.sequence
            args.state.parent.mkdir(parents=True, exist_ok=True)
            args.state.write_text(json.dumps(state))
            handled += 1
            if handled == args.stop_after:
                print(f"stopping after sequence {event.sequence}; run again to resume")
                return 3
    args.state.unlink()
    print("the discussion ended")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
