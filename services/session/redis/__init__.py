"""The session service's pieces shared through Redis by every replica: connection, admission, rate limits, cancels."""
