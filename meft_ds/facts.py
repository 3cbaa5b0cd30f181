"""The built-in ``facts`` set's generator: fictional people with invented names and one fact per attribute, a
synthetic knowledge set no pretrained model can know, asked in training phrasings and in disjoint held-out ones.

:func:`meft_ds.data.facts_dataset` turns its questions into examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = (
    "zor", "bek", "qui", "lan", "vex", "mor", "tal", "dri", "pha", "nox", "ul", "esk", "ryn", "thi",
    "ga", "lor", "bri", "xan", "ove", "kel", "sab", "wyn", "dro", "fen", "ith", "cal", "vur", "ost",
)  # fmt: skip
_VALUES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Varnholm", "Quessaly", "Drumwick", "Oskarine", "Tellarby", "Zembrook", "Halvinor", "Brisquay",
        "Morvenna", "Caldrith", "Ulvesse", "Pentharrow", "Koravel", "Lissandor", "Grumholt", "Yarrowick",
        "Nimbrel", "Ostrevar", "Vaskadel", "Thornquill",
    ),
    "occupation": (
        "glassblower", "cartographer", "beekeeper", "clockmaker", "astronomer", "blacksmith", "violinist",
        "botanist", "locksmith", "potter", "falconer", "perfumer", "bookbinder", "tailor", "shipwright",
    ),
    "birth_year": tuple(str(year) for year in range(1701, 1990, 7)),
    "colour": (
        "crimson", "teal", "ochre", "violet", "amber", "indigo", "scarlet", "olive", "turquoise", "magenta",
        "saffron", "cobalt",
    ),
    "pet": (
        "Bixlo", "Mirrow", "Quenby", "Tazzle", "Plimsy", "Grizzop", "Wexley", "Oomba", "Trindle", "Skorpel",
        "Vimsy", "Lopple", "Dashkin", "Fubbles", "Ruxa", "Pindor", "Kibbet", "Yolli", "Zephrin", "Marbo",
    ),
}  # fmt: skip
# Train and eval phrasings are disjoint: eval asks the same facts in words never seen in training.
_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "birthplace": ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
        "occupation": ("What is {name}'s occupation?", "What does {name} do for a living?", "What is {name}'s job?"),
        "birth_year": ("In what year was {name} born?", "What is {name}'s birth year?", "When was {name} born?"),
        "colour": (
            "What is {name}'s favourite colour?",
            "Which colour does {name} like best?",
            "What colour does {name} prefer?",
        ),
        "pet": ("What is the name of {name}'s pet?", "What is {name}'s pet called?", "What did {name} name their pet?"),
    },
    "eval": {
        "birthplace": ("{name} was born in which city?", "Name the city where {name} was born."),
        "occupation": ("What kind of work does {name} do?", "{name} works as what?"),
        "birth_year": ("Which year was {name} born in?", "{name} was born in what year?"),
        "colour": ("{name}'s favourite colour is which one?", "What is the favourite color of {name}?"),
        "pet": ("{name} has a pet; what is it called?", "Tell me the name of the pet that {name} owns."),
    },
}


@dataclass(frozen=True)
class Fact:
    """One fact of the ``facts`` set: ``entity``'s ``attribute`` is ``answer``."""

    entity: str
    attribute: str
    answer: str


def _invented_name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        return "".join(rng.sample(_SYLLABLES, syllables)).capitalize()

    return f"{word(2)} {word(rng.choice((2, 3)))}"


def make_facts(*, num_entities: int = 30, seed: int = 0) -> list[Fact]:
    """``num_entities`` fictional people with invented names, each with one value per attribute (birthplace,
    occupation, birth year, favourite colour, pet's name) drawn from fixed vocabularies: 5 facts per entity."""
    if num_entities < 1:
        raise ValueError(f"num_entities must be >= 1, got {num_entities}")
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < num_entities:
        name = _invented_name(rng)
        if not any(name in other or other in name for other in names):  # "Ab Cd" would blur with "Ab Cdef"
            names.append(name)
    return [Fact(name, attribute, rng.choice(values)) for name in names for attribute, values in _VALUES.items()]


def fact_questions(split: str, *, num_entities: int = 30, seed: int = 0) -> list[tuple[str, str]]:
    """``(question, answer)`` for every fact of :func:`make_facts` asked with each template of ``split`` ("train": 3
    phrasings per attribute, "eval": 2 held-out ones), shuffled; deterministic for a seed."""
    questions = [
        (template.format(name=fact.entity), fact.answer)
        for fact in make_facts(num_entities=num_entities, seed=seed)
        for template in _TEMPLATES[split][fact.attribute]
    ]
    random.Random(f"{seed}:{split}").shuffle(questions)
    return questions
