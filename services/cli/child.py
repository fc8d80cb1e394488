"""`python -m services.cli.child CMD…`: become CMD, set to get SIGTERM when `roundtable up` dies.

The parent uses gRPC, and forking it to run code before exec (preexec_fn) runs
gRPC's fork handlers in the child, which can abort it. This small process is
started without a preexec_fn, asks the kernel for the parent-death signal
itself, then execs the real command (the setting survives exec).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def guarded(command: list[str]) -> list[str]:
    """The command wrapped so that it dies with this process."""
    return [sys.executable, "-m", "services.cli.child", str(os.getpid()), *command]


def main() -> None:
    """Set the parent-death signal, check the parent is still there, exec the command."""
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m services.cli.child PARENT_PID COMMAND [ARGS…]")
    parent, command = int(sys.argv[1]), sys.argv[2:]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            raise SystemExit("the launcher is gone already")  # it died before the signal was armed
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
