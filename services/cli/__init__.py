"""The `roundtable` command: start the suite on loopback, and talk to it."""
