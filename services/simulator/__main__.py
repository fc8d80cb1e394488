"""Command-line entry point: `python -m services.simulator` / `roundtable-simulator`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from services.simulator.server import start_simulator
from services.simulator.settings import SimulatorSettings


def build_parser() -> argparse.ArgumentParser:
    """Build a parser with one optional flag per settings field (values are validated by pydantic)."""
    parser = argparse.ArgumentParser(
        prog="roundtable-simulator",
        description="OpenAI-compatible LLM simulator. Flags override ROUNDTABLE_SIMULATOR_* env vars.",
    )
    for name, info in SimulatorSettings.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"]
        if "_" in name:
            flags.append(f"--{name}")
        if name == "fail_personas":
            parser.add_argument(
                *flags, dest=name, action="append", metavar="PERSONA", help=f"{info.description} Repeatable."
            )
        else:
            default = info.get_default(call_default_factory=True)
            parser.add_argument(*flags, dest=name, metavar=name.upper(), help=f"{info.description} [{default}]")
    return parser


def load_settings(argv: Sequence[str] | None = None) -> SimulatorSettings:
    """Read settings from env vars, then apply command-line overrides."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {key: value for key, value in vars(args).items() if value is not None}
    if "fail_personas" in overrides:
        overrides["fail_personas"] = ",".join(overrides["fail_personas"])
    try:
        # Init kwargs take precedence over env vars in pydantic-settings, so flags win.
        return SimulatorSettings(**overrides)
    except ValidationError as exc:
        parser.error(str(exc))


async def serve(settings: SimulatorSettings) -> None:
    """Run the simulator until SIGTERM or SIGINT."""
    running = await start_simulator(settings)
    print(f"simulator listening on {running.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Windows has no loop signal handlers; Ctrl+C then arrives as KeyboardInterrupt in main().
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse settings, configure logging and serve until told to stop."""
    settings = load_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
