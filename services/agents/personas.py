"""The persona registry, read from a TOML file: names, aliases, roles, the default roster."""

from __future__ import annotations

import pathlib
import tomllib
from dataclasses import dataclass

DEFAULT_PERSONAS_FILE = pathlib.Path(__file__).with_name("personas.toml")


class PersonaFileError(ValueError):
    """The persona file is unreadable or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Persona:
    """One role an agent can play."""

    name: str
    aliases: tuple[str, ...]
    description: str
    role: str
    moderator: bool = False


@dataclass(frozen=True)
class PersonaRegistry:
    """All personas by canonical name, with alias lookup and the default roster."""

    personas: dict[str, Persona]
    default_roster: tuple[str, ...]

    @classmethod
    def load(cls, path: pathlib.Path = DEFAULT_PERSONAS_FILE) -> PersonaRegistry:
        """Read and validate a persona file."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise PersonaFileError(f"{path}: {error}") from error
        entries = data.get("persona")
        if not isinstance(entries, list) or not entries:
            raise PersonaFileError(f"{path}: needs at least one [[persona]] table")
        personas: dict[str, Persona] = {}
        for index, entry in enumerate(entries):
            persona = _parse_persona(path, index, entry)
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
        return cls(personas=personas, default_roster=tuple(roster))

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


def _parse_persona(path: pathlib.Path, index: int, entry: object) -> Persona:
    where = f"{path}: persona[{index}]"
    if not isinstance(entry, dict):
        raise PersonaFileError(f"{where}: must be a table")
    for field in ("name", "role"):
        value = entry.get(field)
        if not isinstance(value, str) or not value.strip():
            raise PersonaFileError(f"{where}: field {field!r} must be a non-empty string")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise PersonaFileError(f"{where}: field 'aliases' must be a list of non-empty strings")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise PersonaFileError(f"{where}: field 'description' must be a string")
    moderator = entry.get("moderator", False)
    if not isinstance(moderator, bool):
        raise PersonaFileError(f"{where}: field 'moderator' must be true or false")
    unknown = set(entry) - {"name", "aliases", "description", "role", "moderator"}
    if unknown:
        raise PersonaFileError(f"{where}: unknown field(s) {sorted(unknown)}")
    return Persona(
        name=entry["name"].strip(),
        aliases=tuple(a.strip() for a in aliases),
        description=description,
        role=entry["role"].strip(),
        moderator=moderator,
    )
