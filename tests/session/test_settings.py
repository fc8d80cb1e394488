"""Profiles carry the seed's values; flags and environment override them; bad values stop start-up clearly."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.session.keys import add_key
from services.session.settings import SessionSettings


def test_development_profile_has_the_seeds_defaults() -> None:
    settings = SessionSettings()
    assert (settings.max_concurrent_sessions, settings.session_timeout_hours, settings.cleanup_interval_seconds) == (
        100,
        24.0,
        3600.0,
    )
    assert not settings.enable_rate_limiting and not settings.enable_memory_monitoring
    assert settings.allow_anonymous


def test_production_profile_has_the_seeds_production_values(tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys.toml"
    add_key(keys, "alice")
    settings = SessionSettings(profile="production", api_keys_file=keys, internal_token="s" * 16)
    assert (settings.max_concurrent_sessions, settings.session_timeout_hours, settings.cleanup_interval_seconds) == (
        200,
        12.0,
        3600.0,
    )
    assert settings.enable_rate_limiting and settings.enable_memory_monitoring
    assert not settings.allow_anonymous


def test_environment_and_flags_override_the_profile(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys.toml"
    add_key(keys, "alice")
    monkeypatch.setenv("ROUNDTABLE_SESSION_PROFILE", "production")
    monkeypatch.setenv("ROUNDTABLE_INTERNAL_TOKEN", "s" * 16)
    monkeypatch.setenv("ROUNDTABLE_SESSION_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("ROUNDTABLE_SESSION_SESSION_TIMEOUT_HOURS", "6")
    settings = SessionSettings(_cli_parse_args=["--max-concurrent-sessions", "7", "--enable-rate-limiting", "false"])
    assert settings.max_concurrent_sessions == 7  # flag
    assert settings.session_timeout_hours == 6  # environment
    assert not settings.enable_rate_limiting  # flag beats the profile
    assert settings.enable_memory_monitoring  # profile


def test_production_without_keys_is_refused() -> None:
    with pytest.raises(ValidationError, match="api_keys_file"):
        SessionSettings(profile="production", internal_token="s" * 16)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--max-concurrent-sessions", "0", "max_concurrent_sessions"),
        ("--session-timeout-hours", "-1", "session_timeout_hours"),
        ("--store", "postgres", "store"),
        ("--profile", "staging", "profile"),
        ("--api-keys-file", "/nonexistent/keys.toml", "does not exist"),
    ],
)
def test_invalid_values_stop_start_up_naming_flag_and_variable(flag: str, value: str, words: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.session", flag, value], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert words in done.stderr
    assert "ROUNDTABLE_SESSION_" in done.stderr or "api_keys_file" in done.stderr
