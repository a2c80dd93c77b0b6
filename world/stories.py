"""The story world: five-sentence stories whose fourth sentence decides the fifth.

A frame (s1 s2 s3) names a person, a place, a habit and a found object. The fourth
sentence is one of a fixed set of events whose prior depends on the object; the fifth
sentence is the event's outcome, shared by two or three events. So p(s4 | s1..s3) is
spread over every event while p(s4 | s1..s3, s5) is confined to one outcome's events:
the exact infilling posterior is known and non-trivial.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

PEOPLE = [
    ("Anna", "she", "her"), ("Ben", "he", "his"), ("Clara", "she", "her"),
    ("David", "he", "his"), ("Emma", "she", "her"), ("Felix", "he", "his"),
    ("Grace", "she", "her"), ("Henry", "he", "his"), ("Iris", "she", "her"),
    ("Jack", "he", "his"), ("Kate", "she", "her"), ("Leo", "he", "his"),
]
PLACES = [
    "a small town near the sea", "a big city", "a quiet village",
    "a farm in the hills", "a house by the forest", "an old castle",
]
HABITS = [
    "walked to the market", "went to the river", "read a book in the garden",
    "played with friends in the park",
]
OBJECTS = ["an old key", "a gold ring", "a broken clock", "a strange map", "a red kite", "a small box"]

# outcome (s5) -> the events (s4) that lead to it
OUTCOMES: dict[str, list[str]] = {
    "{Name} was very happy that day.": [
        "{Pron} showed it to {pos} friends.", "{Pron} gave it to {pos} mother.",
        "{Pron} kept it in a safe place.",
    ],
    "{Name} cried all night.": ["{Pron} lost it in the river.", "{Pron} dropped it and it broke."],
    "The police thanked {name} for the help.": [
        "{Pron} took it to the police.", "{Pron} told a police officer about it.",
    ],
    "With the money {pron} bought a new bike.": [
        "{Pron} sold it at the market.", "{Pron} sold it to an old man.",
    ],
    "Nobody ever found it again.": ["{Pron} hid it under {pos} bed.", "{Pron} buried it in the garden."],
}
EVENTS = [(event, outcome) for outcome, events in OUTCOMES.items() for event in events]
_BASE_WEIGHTS = [8, 4, 1, 5, 2, 3, 1, 6, 2, 4, 1]


@dataclass(frozen=True)
class Frame:
    """The beginning of a story: who, where, what they did, what they found."""

    person: int
    place: int
    habit: int
    obj: int

    def _slots(self) -> dict[str, str]:
        name, pron, pos = PEOPLE[self.person]
        return {"Name": name, "name": name, "Pron": pron.capitalize(), "pron": pron, "pos": pos}

    @property
    def beginning(self) -> str:
        name, pron, _ = PEOPLE[self.person]
        return (f"{name} lived in {PLACES[self.place]}. Every morning {pron} {HABITS[self.habit]}. "
                f"One day {pron} found {OBJECTS[self.obj]}.")

    def events(self) -> list[str]:
        """Every fourth sentence the world allows for this frame, in a fixed order."""
        return [event.format(**self._slots()) for event, _ in EVENTS]

    def ending(self, event_index: int) -> str:
        return EVENTS[event_index][1].format(**self._slots())

    def prior(self) -> list[float]:
        """p(s4 | s1..s3) of the world: the base weights rotated by the object."""
        shift = 3 * self.obj
        weights = _BASE_WEIGHTS[shift % len(_BASE_WEIGHTS):] + _BASE_WEIGHTS[:shift % len(_BASE_WEIGHTS)]
        total = sum(weights)
        return [w / total for w in weights]

    def story(self, event_index: int) -> str:
        return f"{self.beginning} {self.events()[event_index]} {self.ending(event_index)}"


def all_frames() -> list[Frame]:
    return [Frame(p, pl, h, o) for p in range(len(PEOPLE)) for pl in range(len(PLACES))
            for h in range(len(HABITS)) for o in range(len(OBJECTS))]


def is_heldout(frame: Frame) -> bool:
    """One frame in ten is never shown in training (a stable hash, not the corpus seed)."""
    digest = hashlib.sha256(repr(frame).encode()).digest()
    return digest[0] % 10 == 0


def sample_story(rng: random.Random, frames: list[Frame]) -> tuple[Frame, int]:
    frame = rng.choice(frames)
    event = rng.choices(range(len(EVENTS)), weights=frame.prior())[0]
    return frame, event


def infill_prompt(beginning: str, ending: str) -> str:
    """The Beginning/Ending/Middle format; the middle follows after a space."""
    return f"Beginning: {beginning}\nEnding: {ending}\nMiddle:"
