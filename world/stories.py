"""The story world: five-sentence stories whose fourth sentence decides the fifth.

A frame (s1 s2 s3) names a person, a place, a habit and a found object. The fourth
sentence is one of forty events whose prior depends on the object; the fifth is the event's
outcome, which exactly two events lead to. So p(s4 | s1..s3) is spread over all forty events
while p(s4 | s1..s3, s5) is confined to two, in a ratio the frame decides: the exact
infilling posterior is known, sharp and not trivial, and a sampler of the prior finds an
ending's events about one time in twenty.
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

# outcome (s5) -> the two events (s4) that lead to it
OUTCOMES: dict[str, list[str]] = {
    "{Name} was very happy that day.": ["{Pron} showed it to {pos} friends.", "{Pron} gave it to {pos} mother."],
    "{Name} cried all night.": ["{Pron} lost it in the river.", "{Pron} dropped it and it broke."],
    "The police thanked {name} for the help.": ["{Pron} took it to the police.",
                                                 "{Pron} told a police officer about it."],
    "With the money {pron} bought a new bike.": ["{Pron} sold it at the market.", "{Pron} sold it to an old man."],
    "Nobody ever found it again.": ["{Pron} hid it under {pos} bed.", "{Pron} buried it in the garden."],
    "The teacher said it was very old.": ["{Pron} brought it to school.", "{Pron} showed it to {pos} teacher."],
    "The dog ran away with it.": ["{Pron} left it on the grass.", "{Pron} threw it to the dog."],
    "Now it hangs on the wall of {pos} room.": ["{Pron} cleaned it with a cloth.", "{Pron} painted it blue."],
    "The next day it was gone.": ["{Pron} forgot it on the bus.", "{Pron} left it at the station."],
    "The museum put it in a glass box.": ["{Pron} gave it to the museum.", "{Pron} wrote a letter to the museum."],
    "{Pron} was late for dinner.": ["{Pron} looked at it for hours.", "{Pron} played with it until dark."],
    "It was worth a lot of gold.": ["{Pron} asked a wise man about it.", "{Pron} took it to a shop in town."],
    "The cat slept on it every night.": ["{Pron} put it in a basket.", "{Pron} kept it by the fire."],
    "{Pos} brother wanted it too.": ["{Pron} showed it to {pos} brother.", "{Pron} played with it at home."],
    "The rain washed it away.": ["{Pron} left it outside.", "{Pron} put it on the roof."],
    "A bird took it to its nest.": ["{Pron} put it on a high wall.", "{Pron} left it in a tree."],
    "The old woman smiled and said thank you.": ["{Pron} gave it to an old woman.",
                                                  "{Pron} found its owner in the village."],
    "{Name} never showed it to anyone.": ["{Pron} kept it in a safe place.", "{Pron} locked it in a drawer."],
    "The fire burned it to ashes.": ["{Pron} dropped it in the fire.", "{Pron} put it near the stove."],
    "Everyone in the town knew {name}.": ["{Pron} told the whole town about it.", "{Pron} wrote about it in the paper."],
}
EVENTS = [(event, outcome) for outcome, events in OUTCOMES.items() for event in events]
_BASE_WEIGHTS = [3, 1, 2, 2, 1, 3, 4, 1, 2, 1, 1, 2, 3, 2, 2, 3, 1, 1, 3, 3,
                 4, 2, 2, 4, 1, 4, 3, 1, 2, 2, 1, 3, 2, 1, 1, 2, 3, 2, 2, 3]
_SHIFT = 7  # the prior rotates by this many events per object: each object pairs other weights


@dataclass(frozen=True)
class Frame:
    """The beginning of a story: who, where, what they did, what they found."""

    person: int
    place: int
    habit: int
    obj: int

    def _slots(self) -> dict[str, str]:
        name, pron, pos = PEOPLE[self.person]
        return {"Name": name, "name": name, "Pron": pron.capitalize(), "pron": pron, "pos": pos, "Pos": pos.capitalize()}

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
        shift = _SHIFT * self.obj % len(_BASE_WEIGHTS)
        weights = _BASE_WEIGHTS[shift:] + _BASE_WEIGHTS[:shift]
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
