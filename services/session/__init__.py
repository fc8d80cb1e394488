"""The session service: the public API; owns discussions, their events, admission and expiry."""
