"""The built-in corpus: short English stories shaped like the article's examples.

The article motivates each gate with a sentence:

- forget gate: "Bob is a nice person. Dan, on the other hand, is evil." -- the subject
  switches at the full stop, so the network should forget Bob and track Dan;
- input gate: "Bob can swim. He told me over the phone that he had served in the Navy for
  four long years." -- the Navy is worth remembering, the phone is not;
- output gate: "Bob fought the enemy alone and died for his country. For his contributions,
  brave ____" -- the blank is the person introduced earlier.

Every story (one paragraph; paragraphs are separated by a blank line) is built the same way:

1. a hero is introduced by name ("Bob can swim.") and described with pronouns that agree
   with the name ("He told me over the phone that he had served in the Navy ..."), usually
   with a brave deed ("One day, he fought the enemy alone ...");
2. in most stories the subject then switches at a full stop to someone else ("Dan, on the
   other hand, is evil."), and the next sentence continues with *that* person's pronoun
   ("He lies to everyone."); sometimes a third person follows ("Kate is the sister of Dan.");
3. the story closes with the blank: "For his contributions, brave Bob was given a medal."

The hero's name is never repeated between the introduction and the blank, and nothing but
the introduction says who the hero is: every name is drawn uniformly (the others of either
gender, so the pronoun "his"/"her" alone does not single the hero out), and the words
between are drawn independently of the names. A model that fills the blank has to have kept
the name since the introduction. Stories come in three lengths (:data:`LENGTHS`): short ones
with the name a few words before the blank, and long ones with one or two other people in
between. :func:`held_out` draws evaluation stories from a seed stream disjoint from the
corpus's, with the name at least ``min_words`` words before the blank and another name in
between. The text is plain ASCII.

Everything is deterministic in ``seed`` (``random.Random`` seeded with a string, which does
not depend on ``PYTHONHASHSEED``). The sentence templates, names and word lists are public:
:mod:`glasslstm.tasks.subject` builds its word-level task from the same grammar.
"""

from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import dataclass

__all__ = [
    "ANSWERS",
    "CHOICES",
    "CLOSE_END",
    "CLOSE_OPEN",
    "DEFAULT_STORIES",
    "FEMALE_NAMES",
    "HERO_DEED",
    "HERO_INTRO",
    "HERO_MORE",
    "KIN",
    "LENGTHS",
    "MALE_NAMES",
    "OTHER_MORE",
    "PRONOUNS",
    "SECOND_INTRO",
    "SECOND_MORE",
    "SWITCH",
    "Story",
    "generate_stories",
    "held_out",
    "story",
    "words",
]

# ~100 words a story: 5000 stories is ~2.7 MB of text, ~1.1 million word-level tokens,
# generated in about a second.
DEFAULT_STORIES = 5000

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
# The words that agree with a person's gender, by placeholder.
PRONOUNS = {
    "m": {"he": "he", "He": "He", "his": "his", "His": "His", "him": "him", "person": "man"},
    "f": {"he": "she", "He": "She", "his": "her", "His": "Her", "him": "her", "person": "woman"},
}
# What a person can be *of* someone else ("Karl is the uncle of Nora"), agreeing with gender.
KIN = {
    "m": ("brother", "cousin", "uncle", "father", "neighbour", "son"),
    "f": ("sister", "cousin", "aunt", "mother", "neighbour", "daughter"),
}
# The other placeholders: {city} {job} {skill} {rel} {branch} {years} {place} {thing} {food}
# {animal} {day}, each filled uniformly from its list, independently of everything else.
CHOICES = {
    "city": (
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
        "Athens",
        "Warsaw",
        "Geneva",
        "Toronto",
    ),
    "job": (
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
        "fisherman",
        "soldier",
        "sailor",
        "writer",
        "driver",
        "singer",
    ),
    "skill": (
        "swim",
        "cook",
        "sing",
        "fly a plane",
        "ride a horse",
        "speak French",
        "play the piano",
        "fix a car",
        "climb a mountain",
        "sail a boat",
        "paint",
        "dance",
        "read old maps",
    ),
    "rel": ("brother", "sister", "mother", "father", "uncle", "aunt", "cousin", "friend"),
    "branch": ("Navy", "Navy", "Navy", "Army", "Air Force", "Coast Guard"),
    "years": ("two", "three", "four", "four", "four", "five", "six", "ten"),
    "place": ("market", "harbour", "station", "library", "tavern", "casino", "church", "park"),
    "thing": ("horse", "car", "house", "boat", "garden", "farm", "shop", "piano"),
    "food": ("bread", "soup", "fish", "apples", "cheese", "cake"),
    "animal": ("dog", "cat", "horse", "goat", "bird"),
    "day": ("Monday", "Sunday", "night", "morning", "winter", "summer"),
}

# Sentence templates. {N} is the person's name; {he} {He} {his} {His} {him} {person} {kin}
# agree with the person's gender; {other} (in SECOND_INTRO) is the previous person's name.
# The hero is introduced by name (the name comes first), then described with pronouns only.
HERO_INTRO = (
    "{N} is a nice person.",
    "{N} can {skill}.",
    "{N} is a kind {person}.",
    "{N} lives in {city}.",
    "{N} is a good friend of mine.",
    "{N} grew up in {city}.",
    "{N} works as a {job}.",
    "{N} is a brave {person}.",
    "{N} was born in {city}.",
    "{N} is an old friend of my {rel}.",
    "{N} fought the enemy alone and died for {his} country.",
    "{N} fought the enemy alone and nearly died for {his} country.",
    "{N} served in the {branch} for {years} long years.",
    "{N} has a {thing} and a {animal}.",
)
HERO_MORE = (
    "{He} told me over the phone that {he} had served in the {branch} for {years} long years.",
    "{He} served in the {branch} for {years} long years.",
    "{He} can {skill}.",
    "{He} lives in {city} with {his} {rel}.",
    "{He} once told me that {his} {rel} was a {job}.",
    "{He} is always kind to {his} neighbours.",
    "{He} works as a {job} in {city}.",
    "{His} {rel} still lives in {city}.",
    "{He} likes {food} and long walks.",
    "{He} goes to the {place} every {day}.",
    "{He} gave {his} {thing} to the poor.",
    "{He} helps everyone in {city}.",
    "{He} once lived near the {place} in {city}.",
)
HERO_DEED = (
    "One day, {he} fought the enemy alone and nearly died for {his} country.",
    "{He} fought the enemy alone and died for {his} country.",
    "{He} once pulled a child out of the river.",
    "During the storm, {he} saved three sailors from the sea.",
    "{He} carried an old man out of a burning house.",
    "When the war came, {he} defended the bridge alone for {years} days.",
    "{He} stopped a runaway horse in the middle of the market.",
    "{He} saved a family from a fire in {city}.",
    "{He} fought a wolf to protect the children.",
    "{He} led the soldiers home through the snow.",
    "{He} gave {his} life to save the town.",
    "When the river flooded the town, {he} rescued everyone from the water.",
)
SWITCH = (
    "{N}, on the other hand, is evil.",
    "{N}, on the other hand, is a mean person.",
    "{N}, on the other hand, cannot {skill}.",
    "{N}, on the other hand, never left {city}.",
    "{N}, on the other hand, is lazy and rude.",
    "{N}, on the other hand, lies to everyone.",
    "{N}, on the other hand, ran away from the enemy.",
    "{N}, on the other hand, is a coward.",
    "{N}, on the other hand, works as a {job} in {city}.",
    "{N}, however, is evil.",
    "{N}, however, stayed at home.",
    "{N}, however, never helps anyone.",
)
# What follows a subject switch: every sentence starts with the new subject's pronoun, so the
# word after a switch is "He" or "She" by the switched-to person's gender alone.
OTHER_MORE = (
    "{He} lives in {city}.",
    "{He} steals from {his} neighbours.",
    "{He} told me over the phone that {he} had never served in the {branch}.",
    "{He} spends {his} days at the {place}.",
    "{He} works as a {job}, but nobody trusts {him}.",
    "{He} visits {his} {rel} in {city} every {day}.",
    "{He} laughed when the town was in danger.",
    "{He} never helps anyone.",
    "{He} sold {his} {thing} for a little money.",
    "{He} stayed in bed when the town was on fire.",
    "{He} likes {food} more than people.",
    "{He} hid at the {place} during the war.",
)
SECOND_INTRO = (
    "{N} is the {kin} of {other}.",
    "{N} is a friend of {other}.",
    "{N} met {other} in {city}.",
    "{N} works with {other} at the {place}.",
)
SECOND_MORE = (
    "{He} can {skill}, but {he} stayed at home.",
    "{He} works as a {job} in {city}.",
    "{He} does not like {his} neighbours.",
    "{He} only cares about {his} {thing}.",
)
# (template, weight): the article's "For his contributions, brave" is the common case.
CLOSE_OPEN = (
    ("For {his} contributions, brave", 6),
    ("For {his} courage, brave", 1),
    ("For {his} service, brave", 1),
)
CLOSE_END = (
    "was given a medal.",
    "was thanked by the whole town.",
    "is remembered by everyone.",
    "was made a hero.",
)

# The answers the article asks about, as a regular expression over the text (see
# glasslstm.documents): the name after "brave", and the pronoun that starts the sentence after
# a subject switch (the regex's group).
ANSWERS = r"(?<=, brave )[A-Z]\w*|(?:on the other hand|however), [^.]*\. (\w+)"

# Story lengths, (name, probability): what sits between the hero's introduction and the blank.
# short: up to two more sentences about the hero; medium and long: the hero's sentences, then
# one or two episodes about other people, each opened by a subject switch.
LENGTHS = (("short", 0.25), ("medium", 0.4), ("long", 0.35))

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The words of ``text`` (runs of letters and digits), as the distances count them."""
    return _WORD.findall(text)


@dataclass(frozen=True)
class Story:
    """One story and where its two tests are.

    ``text[:blank]`` ends in "..., brave": the next word is ``hero``. Each ``(end, pronoun)``
    of ``switches``: ``text[:end]`` ends with a subject switch's full stop ("Dan, on the other
    hand, is evil."), and the next word is ``pronoun`` ("He" or "She", the switched-to
    person's). ``distance``: words from the hero's name (exclusive) to the blank (inclusive of
    "brave"); ``between``: the other names said in that stretch, in order.
    """

    text: str
    hero: str
    gender: str  # "m" or "f"
    blank: int
    switches: tuple[tuple[int, str], ...]
    distance: int
    between: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The story up to the blank: ends in "brave"; the answer is " " + hero."""
        return self.text[: self.blank]


def _person(rng: random.Random, exclude: tuple[str, ...] = ()) -> tuple[str, str, dict[str, str]]:
    """A name, its gender and the words that agree with it."""
    gender = rng.choice("mf")
    names = MALE_NAMES if gender == "m" else FEMALE_NAMES
    name = rng.choice(names)
    while name in exclude:
        name = rng.choice(names)
    return name, gender, {**PRONOUNS[gender], "kin": rng.choice(KIN[gender])}


@functools.cache
def _slots(template: str) -> tuple[str, ...]:
    """The CHOICES placeholders of a template, in order of first appearance."""
    found = (f for _, f, _, _ in string.Formatter().parse(template) if f in CHOICES)
    return tuple(dict.fromkeys(found))


def _fill(rng: random.Random, template: str, name: str, pron: dict[str, str], **extra) -> str:
    filled = {key: rng.choice(CHOICES[key]) for key in _slots(template)}
    return template.format(N=name, **filled, **pron, **extra)


def _add(parts: list[str], sentence: str) -> None:
    """Append ``sentence`` unless it repeats what an earlier one says (same two words after
    the subject: "Zoe fought the enemy ..." then "She fought the enemy ...")."""
    key = words(sentence)[1:3]
    if all(words(p)[1:3] != key for p in parts):
        parts.append(sentence)


def _close_open(rng: random.Random) -> str:
    return rng.choices([t for t, _ in CLOSE_OPEN], weights=[w for _, w in CLOSE_OPEN])[0]


def story(rng: random.Random, length: str | None = None) -> Story:
    """One story drawn from ``rng``; ``length`` one of :data:`LENGTHS`' names (default: drawn
    with their probabilities)."""
    if length is None:
        length = rng.choices([n for n, _ in LENGTHS], weights=[p for _, p in LENGTHS])[0]
    elif length not in dict(LENGTHS):
        raise ValueError(f"length must be one of {', '.join(dict(LENGTHS))}; got {length!r}")
    hero, gender, hp = _person(rng)
    parts = [_fill(rng, rng.choice(HERO_INTRO), hero, hp)]
    n_more = rng.randint(0, 2) if length == "short" else rng.randint(1, 2)
    for t in rng.sample(HERO_MORE, n_more):
        _add(parts, _fill(rng, t, hero, hp))
    if length != "short" or rng.random() < 0.5:
        _add(parts, _fill(rng, rng.choice(HERO_DEED), hero, hp))

    names, switch_at = [hero], []  # switch_at: (index of the switch sentence, its pronoun)
    for _ in range({"short": 0, "medium": 1, "long": 2}[length]):
        other, _, op = _person(rng, exclude=(hero,))
        names.append(other)
        switch_at.append((len(parts), op["He"]))
        parts.append(_fill(rng, rng.choice(SWITCH), other, op))
        for t in rng.sample(OTHER_MORE, rng.randint(1, 3)):
            parts.append(_fill(rng, t, other, op))
        if rng.random() < 0.3:
            second, _, sp = _person(rng, exclude=tuple(names))
            names.append(second)
            parts.append(_fill(rng, rng.choice(SECOND_INTRO), second, sp, other=other))
            parts.append(_fill(rng, rng.choice(SECOND_MORE), second, sp))

    prompt = " ".join(parts) + " " + _close_open(rng).format(**hp)
    text = f"{prompt} {hero} {rng.choice(CLOSE_END)}"
    # where each switch sentence ends: the parts are joined by single spaces
    ends = [len(" ".join(parts[: k + 1])) for k in range(len(parts))]
    switches = tuple((ends[k], pronoun) for k, pronoun in switch_at)
    after = prompt[len(hero) :]  # the hero's name is the first word, and only said there
    between = tuple(w for w in words(after) if w in _ALL_NAMES)
    return Story(text, hero, gender, len(prompt), switches, len(words(after)), between)


_ALL_NAMES = frozenset(MALE_NAMES + FEMALE_NAMES)


def generate_stories(seed: int = 0, n_stories: int = DEFAULT_STORIES) -> str:
    """The built-in corpus: ``n_stories`` paragraphs separated by blank lines, ending in "\\n".

    Deterministic in ``seed``; plain ASCII; ~100 words a story.
    """
    if n_stories < 1:
        raise ValueError(f"n_stories must be at least 1, got {n_stories}")
    rng = random.Random(f"glasslstm.stories corpus {seed}")
    return "\n\n".join(story(rng).text for _ in range(n_stories)) + "\n"


def held_out(seed: int = 0, n: int = 200, *, min_words: int = 30) -> list[Story]:
    """``n`` evaluation stories from a seed stream disjoint from every corpus's: medium and
    long stories whose hero was named at least ``min_words`` words before the blank, with at
    least one other name in between (drawn until ``n`` of them qualify)."""
    if n < 1 or min_words < 1:
        raise ValueError(f"n and min_words must be at least 1; got {n}, {min_words}")
    rng = random.Random(f"glasslstm.stories held-out {seed}")
    out: list[Story] = []
    for _ in range(1000 * n):
        s = story(rng, rng.choice(("medium", "long")))
        if s.distance >= min_words and s.between:
            out.append(s)
            if len(out) == n:
                return out
    raise ValueError(f"no story reaches {min_words} words between the name and the blank")
