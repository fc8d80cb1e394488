"""The persona registry, read from a TOML file: names, aliases, roles, model choices, the default roster."""

from __future__ import annotations

import functools
import pathlib
import tomllib
from dataclasses import dataclass

from services.agents.llm import CLIENT_KINDS, CallOptions, ClientKind

DEFAULT_PERSONAS_FILE = pathlib.Path(__file__).with_name("personas.toml")
# The same bounds AgentsSettings puts on the service-wide values.
MAX_TEMPERATURE = 2.0
MAX_TOKENS_LIMIT = 32_768

_PERSONA_FIELDS = {
    *("name", "aliases", "description", "role", "moderator"),
    *("backend", "model", "temperature", "max_tokens"),
}
_BACKEND_FIELDS = {
    *("name", "base_url", "model", "api_key", "client", "organization", "project"),
    *("requests_per_minute", "tokens_per_minute"),
}


class PersonaFileError(ValueError):
    """The persona file is unreadable or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class BackendSpec:
    """An extra OpenAI-compatible endpoint named in the persona file, for personas that use another model."""

    name: str
    base_url: str
    model: str
    # None: the service's --llm-api-key (local servers ignore it).
    api_key: str | None = None
    # None: the service's --llm-client.
    client: ClientKind | None = None
    organization: str = ""
    project: str = ""
    # The provider's quota for this endpoint and key, kept fleet-wide; 0 = no limit.
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class Persona:
    """One role an agent can play, and optionally the backend, model and sampling it uses."""

    name: str
    aliases: tuple[str, ...]
    description: str
    role: str
    moderator: bool = False
    # None: the service's own backend and settings (--llm-base-url, --llm-model, ...).
    backend: str | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    # Cached: every LLM call reads it, and the persona never changes.
    @functools.cached_property
    def call_options(self) -> CallOptions:
        """The model choices its LLM calls carry."""
        return CallOptions(
            backend=self.backend, model=self.model, temperature=self.temperature, max_tokens=self.max_tokens
        )


@dataclass(frozen=True)
class PersonaRegistry:
    """All personas by canonical name, with alias lookup, the default roster and the extra backends."""

    personas: dict[str, Persona]
    default_roster: tuple[str, ...]
    backends: dict[str, BackendSpec]

    @classmethod
    def load(cls, path: pathlib.Path = DEFAULT_PERSONAS_FILE) -> PersonaRegistry:
        """Read and validate a persona file."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise PersonaFileError(f"{path}: {error}") from error
        unknown = set(data) - {"persona", "backend", "default_roster"}
        if unknown:
            raise PersonaFileError(f"{path}: unknown top-level field(s) {sorted(unknown)}")
        backends = _parse_backends(path, data.get("backend", []))
        entries = data.get("persona")
        if not isinstance(entries, list) or not entries:
            raise PersonaFileError(f"{path}: needs at least one [[persona]] table")
        personas: dict[str, Persona] = {}
        for index, entry in enumerate(entries):
            persona = _parse_persona(path, index, entry, backends)
            for key in (persona.name, *persona.aliases):
                if any(key.casefold() in _keys(p) for p in personas.values()):
                    raise PersonaFileError(f"{path}: persona[{index}]: name or alias {key!r} is used twice")
            personas[persona.name] = persona
        moderators = [p.name for p in personas.values() if p.moderator]
        if len(moderators) != 1:
            raise PersonaFileError(f"{path}: exactly one persona needs moderator = true, found {moderators}")
        roster = data.get("default_roster", list(personas))
        if not isinstance(roster, list) or not all(isinstance(n, str) and n in personas for n in roster):
            raise PersonaFileError(f"{path}: default_roster must list canonical persona names, got {roster!r}")
        return cls(personas=personas, default_roster=tuple(roster), backends=backends)

    @property
    def moderator(self) -> Persona:
        """The persona that writes the summary."""
        return next(p for p in self.personas.values() if p.moderator)

    def resolve(self, name: str) -> Persona | None:
        """The persona with this name or alias (case-insensitive), if any."""
        wanted = name.strip().casefold()
        return next((p for p in self.personas.values() if wanted in _keys(p)), None)


def _keys(persona: Persona) -> set[str]:
    return {persona.name.casefold(), *(alias.casefold() for alias in persona.aliases)}


def _non_empty_string(where: str, entry: dict[str, object], field: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise PersonaFileError(f"{where}: field {field!r} must be a non-empty string")
    return value.strip()


def _parse_backends(path: pathlib.Path, entries: object) -> dict[str, BackendSpec]:
    if not isinstance(entries, list):
        raise PersonaFileError(f"{path}: 'backend' must be an array of [[backend]] tables")
    backends: dict[str, BackendSpec] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: backend[{index}]"
        if not isinstance(entry, dict):
            raise PersonaFileError(f"{where}: must be a table")
        unknown = set(entry) - _BACKEND_FIELDS
        if unknown:
            raise PersonaFileError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = _non_empty_string(where, entry, "name")
        if name in backends:
            raise PersonaFileError(f"{where}: field 'name': backend {name!r} is defined twice")
        base_url = _non_empty_string(where, entry, "base_url")
        if not base_url.startswith(("http://", "https://")):
            raise PersonaFileError(f"{where}: field 'base_url' must be an http:// or https:// URL, got {base_url!r}")
        api_key = entry.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise PersonaFileError(f"{where}: field 'api_key' must be a string")
        client = entry.get("client")
        if client is not None and client not in CLIENT_KINDS:
            raise PersonaFileError(
                f"{where}: field 'client' must be one of {', '.join(map(repr, CLIENT_KINDS))}, got {client!r}"
            )
        for field in ("organization", "project"):
            if not isinstance(entry.get(field, ""), str):
                raise PersonaFileError(f"{where}: field {field!r} must be a string")
        for field in ("requests_per_minute", "tokens_per_minute"):
            limit = entry.get(field, 0)
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise PersonaFileError(f"{where}: field {field!r} must be a whole number, 0 (no limit) or more")
        backends[name] = BackendSpec(
            name=name,
            base_url=base_url,
            model=_non_empty_string(where, entry, "model"),
            api_key=api_key,
            client=client,
            organization=entry.get("organization", ""),
            project=entry.get("project", ""),
            requests_per_minute=entry.get("requests_per_minute", 0),
            tokens_per_minute=entry.get("tokens_per_minute", 0),
        )
    return backends


def _parse_persona(path: pathlib.Path, index: int, entry: object, backends: dict[str, BackendSpec]) -> Persona:
    where = f"{path}: persona[{index}]"
    if not isinstance(entry, dict):
        raise PersonaFileError(f"{where}: must be a table")
    unknown = set(entry) - _PERSONA_FIELDS
    if unknown:
        raise PersonaFileError(f"{where}: unknown field(s) {sorted(unknown)}")
    name = _non_empty_string(where, entry, "name")
    role = _non_empty_string(where, entry, "role")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise PersonaFileError(f"{where}: field 'aliases' must be a list of non-empty strings")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise PersonaFileError(f"{where}: field 'description' must be a string")
    moderator = entry.get("moderator", False)
    if not isinstance(moderator, bool):
        raise PersonaFileError(f"{where}: field 'moderator' must be true or false")
    backend = None
    if "backend" in entry:
        backend = _non_empty_string(where, entry, "backend")
        if backend not in backends:
            known = ", ".join(sorted(backends)) or "none"
            raise PersonaFileError(
                f"{where}: field 'backend' names {backend!r}, which no [[backend]] table defines (defined: {known})"
            )
    model = _non_empty_string(where, entry, "model") if "model" in entry else None
    temperature = entry.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= MAX_TEMPERATURE
    ):
        raise PersonaFileError(f"{where}: field 'temperature' must be a number from 0 to {MAX_TEMPERATURE:g}")
    max_tokens = entry.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise PersonaFileError(f"{where}: field 'max_tokens' must be a whole number from 1 to {MAX_TOKENS_LIMIT}")
    return Persona(
        name=name,
        aliases=tuple(a.strip() for a in aliases),
        description=description,
        role=role,
        moderator=moderator,
        backend=backend,
        model=model,
        temperature=None if temperature is None else float(temperature),
        max_tokens=max_tokens,
    )
