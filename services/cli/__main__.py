"""python -m services.cli: the same as the `roundtable` command."""

from services.cli.main import main

main()
