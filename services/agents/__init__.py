"""The agent service: one isolated agent set per session, rounds of debate, a moderator's summary."""
