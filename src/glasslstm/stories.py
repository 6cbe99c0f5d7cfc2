"""The built-in corpus: short English stories shaped like the article's examples.

The article motivates each gate with a sentence:

- forget gate: "Bob is a nice person. Dan, on the other hand, is evil." -- the subject
  switches at the full stop, so the network should forget Bob and track Dan;
- input gate: "Bob can swim. He told me over the phone that he had served in the Navy for
  four long years." -- the Navy is worth remembering, the phone is not;
- output gate: "... For his contributions, brave ____" -- the blank is the person introduced
  earlier.

Every story (one paragraph, paragraphs separated by a blank line) is built the same way:

1. a hero is introduced by name ("Bob can swim.") and described with pronouns that agree
   with the name ("He told me over the phone that he had served in the Navy ..."),
2. the hero does something brave ("One day, he fought the enemy alone ..."),
3. the subject switches at a full stop to a distractor ("Dan, on the other hand, is evil."),
   described with *its* pronouns, sometimes with a second distractor,
4. the story closes with the blank: "For his contributions, brave Bob was given a medal."

The hero's name is never repeated between the introduction and the blank, so a model that
fills the blank has to carry the name (and the gender in "his"/"her") across the whole
distractor section: at least :data:`MIN_BLANK_DISTANCE` characters. The text is plain ASCII.

Everything is deterministic in ``seed`` (``random.Random`` seeded with a string, which does
not depend on ``PYTHONHASHSEED``). The corpus and :func:`fill_in_examples` use disjoint seed
strings, so evaluation examples are not drawn from the training stream.
"""

from __future__ import annotations

import random

__all__ = [
    "DEFAULT_STORIES",
    "FEMALE_NAMES",
    "MALE_NAMES",
    "MIN_BLANK_DISTANCE",
    "fill_in_examples",
    "generate_stories",
]

# ~330 characters a story: 5000 stories is ~1.65 MB, enough for a small char LSTM to learn
# the structure in minutes, and it is generated in well under a second.
DEFAULT_STORIES = 5000
# The hero's name appears at least this many characters before the blank.
MIN_BLANK_DISTANCE = 100

MALE_NAMES = (
    "Bob",
    "Dan",
    "Tom",
    "Sam",
    "Jack",
    "Paul",
    "Mark",
    "Luke",
    "Adam",
    "Ben",
    "Carl",
    "Eric",
    "Fred",
    "Greg",
    "Hugo",
    "Ivan",
    "Joe",
    "Karl",
    "Leo",
    "Max",
    "Ned",
    "Oscar",
    "Pete",
    "Ray",
    "Steve",
    "Ted",
    "Victor",
    "Walter",
    "Henry",
    "George",
    "Frank",
    "Arthur",
)
FEMALE_NAMES = (
    "Alice",
    "Anna",
    "Beth",
    "Clara",
    "Diana",
    "Emma",
    "Fiona",
    "Grace",
    "Helen",
    "Iris",
    "Jane",
    "Kate",
    "Laura",
    "Mary",
    "Nora",
    "Olga",
    "Paula",
    "Rose",
    "Sara",
    "Tina",
    "Ursula",
    "Vera",
    "Wendy",
    "Zoe",
    "Lucy",
    "Ruth",
    "Eva",
    "Maria",
    "Julia",
    "Sophie",
    "Linda",
    "Ella",
)
_PRONOUNS = {
    "m": {"he": "he", "He": "He", "his": "his", "His": "His", "him": "him", "person": "man"},
    "f": {"he": "she", "He": "She", "his": "her", "His": "Her", "him": "her", "person": "woman"},
}
# What a person can be *of* someone else ("Karl is the uncle of Nora"), agreeing with gender.
_KIN = {
    "m": ("brother", "cousin", "uncle", "father", "neighbour"),
    "f": ("sister", "cousin", "aunt", "mother", "neighbour"),
}
_CITIES = (
    "Rome",
    "Paris",
    "London",
    "Boston",
    "Dublin",
    "Madrid",
    "Oslo",
    "Vienna",
    "Lisbon",
    "Naples",
    "Chicago",
    "Denver",
    "Berlin",
    "Prague",
    "Milan",
    "Seattle",
)
_JOBS = (
    "teacher",
    "baker",
    "doctor",
    "farmer",
    "painter",
    "nurse",
    "pilot",
    "lawyer",
    "carpenter",
    "cook",
)
_SKILLS = (
    "swim",
    "cook",
    "sing",
    "fly a plane",
    "ride a horse",
    "speak French",
    "play the piano",
    "fix a car",
    "climb a mountain",
)
_RELATIVES = ("brother", "sister", "mother", "father", "uncle", "aunt", "cousin")
_BRANCHES = ("Navy", "Navy", "Navy", "Army", "Air Force", "Coast Guard")
_YEARS = ("two", "three", "four", "four", "four", "five", "six", "ten")
_PLACES = ("market", "harbour", "station", "library", "tavern", "casino")

# Sentence templates. {N} is the person's name; {he} {He} {his} {His} {him} {person} {kin}
# agree with the person's gender; {city} {job} {skill} {rel} {branch} {years} {place} are filled
# at random.
_HERO_INTRO = (
    "{N} is a nice person.",
    "{N} can {skill}.",
    "{N} is a kind {person}.",
    "{N} lives in {city}.",
    "{N} is a good friend of mine.",
    "{N} grew up in {city}.",
    "{N} works as a {job}.",
)
_HERO_MORE = (
    "{He} told me over the phone that {he} had served in the {branch} for {years} long years.",
    "{He} served in the {branch} for {years} long years.",
    "{He} can {skill}.",
    "{He} lives in {city} with {his} {rel}.",
    "{He} once told me that {his} {rel} was a {job}.",
    "{He} is always kind to {his} neighbours.",
    "{He} works as a {job} in {city}.",
    "{His} {rel} still lives in {city}.",
)
_HERO_DEED = (
    "One day, {he} fought the enemy alone and nearly died for {his} country.",
    "{He} once pulled a child out of the river.",
    "During the storm, {he} saved three sailors from the sea.",
    "{He} carried an old man out of a burning house.",
    "When the war came, {he} defended the bridge alone for {years} days.",
    "{He} stopped a runaway horse in the middle of the market.",
)
_SWITCH = (
    "{N}, on the other hand, is evil.",
    "{N}, on the other hand, is a mean person.",
    "{N}, on the other hand, cannot {skill}.",
    "{N}, on the other hand, never left {city}.",
    "{N}, on the other hand, is lazy and rude.",
    "{N}, on the other hand, lies to everyone.",
)
_OTHER_MORE = (
    "{He} lives in {city}.",
    "{He} steals from {his} neighbours.",
    "{He} told me over the phone that {he} had never served in the {branch}.",
    "{He} spends {his} days at the {place}.",
    "{He} works as a {job}, but nobody trusts {him}.",
    "{His} {rel} lives in {city}.",
    "{He} laughed when the town was in danger.",
    "{He} never helps anyone.",
)
_SECOND_INTRO = (
    "{N} is the {kin} of {other}.",
    "{N} is a friend of {other}.",
    "{N} met {other} in {city}.",
)
_SECOND_MORE = (
    "{He} can {skill}, but {he} stayed at home.",
    "{He} works as a {job} in {city}.",
    "{He} does not like {his} neighbours.",
)
# (template, weight): the article's "For his contributions, brave" is the common case.
_CLOSE_OPEN = (
    ("For {his} contributions, brave", 6),
    ("For {his} courage, brave", 1),
    ("For {his} service, brave", 1),
)
_CLOSE_END = (
    "was given a medal.",
    "was thanked by the whole town.",
    "is remembered by everyone.",
    "was made a hero.",
)


def _person(rng: random.Random, exclude: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    """A name and the words that agree with its gender."""
    gender = rng.choice("mf")
    names = MALE_NAMES if gender == "m" else FEMALE_NAMES
    name = rng.choice(names)
    while name in exclude:
        name = rng.choice(names)
    return name, {**_PRONOUNS[gender], "kin": rng.choice(_KIN[gender])}


def _fill(rng: random.Random, template: str, name: str, pron: dict[str, str], **extra: str) -> str:
    return template.format(
        N=name,
        city=rng.choice(_CITIES),
        job=rng.choice(_JOBS),
        skill=rng.choice(_SKILLS),
        rel=rng.choice(_RELATIVES),
        branch=rng.choice(_BRANCHES),
        years=rng.choice(_YEARS),
        place=rng.choice(_PLACES),
        **pron,
        **extra,
    )


def _story(rng: random.Random) -> tuple[str, str, int]:
    """One paragraph. Returns (text, hero name, index just past "brave" before the blank)."""
    hero, hp = _person(rng)
    parts = [_fill(rng, rng.choice(_HERO_INTRO), hero, hp)]
    for t in rng.sample(_HERO_MORE, rng.randint(1, 2)):
        parts.append(_fill(rng, t, hero, hp))
    parts.append(_fill(rng, rng.choice(_HERO_DEED), hero, hp))

    other, op = _person(rng, exclude=(hero,))
    parts.append(_fill(rng, rng.choice(_SWITCH), other, op))
    for t in rng.sample(_OTHER_MORE, rng.randint(1, 3)):
        parts.append(_fill(rng, t, other, op))
    if rng.random() < 0.3:
        second, sp = _person(rng, exclude=(hero, other))
        parts.append(_fill(rng, rng.choice(_SECOND_INTRO), second, sp, other=other))
        parts.append(_fill(rng, rng.choice(_SECOND_MORE), second, sp))

    opening = rng.choices([t for t, _ in _CLOSE_OPEN], weights=[w for _, w in _CLOSE_OPEN])[0]
    body = " ".join(parts)
    prompt = body + " " + opening.format(**hp)
    text = f"{prompt} {hero} {rng.choice(_CLOSE_END)}"
    # The hero's name appears only in the first sentence; its end is len(hero) from the start.
    assert len(prompt) - len(hero) >= MIN_BLANK_DISTANCE, prompt
    return text, hero, len(prompt)


def generate_stories(seed: int = 0, n_stories: int = DEFAULT_STORIES) -> str:
    """The built-in corpus: ``n_stories`` paragraphs separated by blank lines, ending in "\\n".

    Deterministic in ``seed``; plain ASCII; ~330 characters a story (the default is ~1.65 MB).
    """
    if n_stories < 1:
        raise ValueError(f"n_stories must be at least 1, got {n_stories}")
    rng = random.Random(f"glasslstm.stories corpus {seed}")
    return "\n\n".join(_story(rng)[0] for _ in range(n_stories)) + "\n"


def fill_in_examples(seed: int = 0, n: int = 10) -> list[tuple[str, str]]:
    """``n`` fill-in-the-blank examples: ``(prompt, answer)``.

    ``prompt`` is one story cut right before the blank name, ending in "..., brave" (no
    trailing space: the expected continuation is ``" " + answer``); ``answer`` is the hero's
    name, which appears in the story's first sentence and nowhere else before the blank. The
    stories are generated like the corpus but from a disjoint seed stream, so they are not the
    corpus's own stories.
    """
    rng = random.Random(f"glasslstm.stories fill-in {seed}")
    out = []
    for _ in range(n):
        text, hero, cut = _story(rng)
        out.append((text[:cut], hero))
    return out
