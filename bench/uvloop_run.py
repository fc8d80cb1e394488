"""Run a service module on uvloop instead of asyncio's default loop: `python -m bench.uvloop_run MODULE ARGS…`.

The product does not use uvloop; this measures what it would gain (issue 7 lists it
as a lever) without changing the product: the loop policy is set, then the module
runs as `python -m MODULE` would run it.
"""

from __future__ import annotations

import asyncio
import runpy
import sys

import uvloop


def main() -> None:
    """Set uvloop's policy, then run the module named first with the remaining arguments."""
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.uvloop_run MODULE [ARGS…]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
