"""Where discussions and their events live: one interface (interface.py), three implementations."""
