"""Every prompt the agents send, in one readable place.

The simulator relies on two conventions kept here: the system prompt starts
with "You are <name>," and the last line of each user prompt is "Topic: <topic>".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from services.agents.personas import Persona

LANGUAGE_RULE = "Answer in the language the topic is written in."


# One string per persona, shared by every agent that plays it (personas are few and immutable).
@functools.cache
def system_prompt(persona: Persona) -> str:
    """Who the agent is."""
    return f"You are {persona.name}, {persona.role}. {LANGUAGE_RULE} Be concrete and brief."


def opening_prompt(topic: str) -> str:
    """Round 1: an independent first analysis."""
    return (
        "Give your own analysis of the topic below from your discipline's point of view: "
        "the two or three points that matter most.\n"
        f"Topic: {topic}"
    )


def debate_prompt(topic: str, round_number: int, others: Mapping[str, str]) -> str:
    """Round r > 1: read the others' previous answers, then refine or rebut."""
    if not others:
        return (
            f"Round {round_number}. No other panelist answered in the previous round. Re-examine your own "
            "answer: what did it miss, and what is your updated view?\n"
            f"Topic: {topic}"
        )
    answers = "\n\n".join(f"[{name}]\n{text}" for name, text in others.items())
    return (
        f"Round {round_number}. The other panelists answered in the previous round:\n\n{answers}\n\n"
        "Refine your position in the light of theirs: say where you agree, rebut what you think "
        "is wrong, and state your updated view.\n"
        f"Topic: {topic}"
    )


def summary_prompt(topic: str, final_answers: Mapping[str, str]) -> str:
    """The moderator's summary of every panelist's final answer."""
    answers = "\n\n".join(f"[{name}]\n{text}" for name, text in final_answers.items())
    return (
        f"The panel's final answers:\n\n{answers}\n\n"
        "Summarise the discussion: the points of agreement, the points of disagreement, "
        "and a conclusion.\n"
        f"Topic: {topic}"
    )
