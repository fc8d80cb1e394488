"""`python -m deploy.k8s` writes deploy/k8s/<env>/ for every environment; `--check` only compares."""

from __future__ import annotations

import argparse
import sys

from deploy.k8s.environments import ENVIRONMENTS
from deploy.k8s.render import differences, write


def main(argv: list[str] | None = None) -> int:
    """Render (or check) every environment; exit 1 when --check finds a difference."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="report files that differ from a fresh render")
    args = parser.parse_args(argv)
    if args.check:
        problems = [problem for env in ENVIRONMENTS for problem in differences(env)]
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python -m deploy.k8s", file=sys.stderr)
        return 1 if problems else 0
    for env in ENVIRONMENTS:
        for path in write(env):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
