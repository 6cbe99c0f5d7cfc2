"""The built-in stories corpus (glasslstm.stories): its grammar, its tests, no shortcuts."""

from __future__ import annotations

import random
import re

import pytest

from glasslstm import stories
from glasslstm.data import load_corpus

MALE, FEMALE = set(stories.MALE_NAMES), set(stories.FEMALE_NAMES)
NAMES = MALE | FEMALE
PRONOUN_OF = {"m": ("He", "His"), "f": ("She", "Her")}
GENDERED = {"m": {"He", "he", "His", "his", "him"}, "f": {"She", "she", "Her", "her"}}


def gender(name: str) -> str:
    return "m" if name in MALE else "f"


def sentences(paragraph: str) -> list[str]:
    return re.split(r"(?<=\.) ", paragraph)


def test_deterministic_per_seed_and_different_across_seeds():
    a = stories.generate_stories(seed=3, n_stories=50)
    assert a == stories.generate_stories(seed=3, n_stories=50)
    assert a != stories.generate_stories(seed=4, n_stories=50)
    assert stories.held_out(1, 5) == stories.held_out(1, 5)
    assert stories.held_out(1, 5) != stories.held_out(2, 5)
    with pytest.raises(ValueError, match="n_stories must be at least 1"):
        stories.generate_stories(0, 0)
    with pytest.raises(ValueError, match="length must be one of short, medium, long"):
        stories.story(random.Random(0), "huge")


@pytest.mark.slow
def test_default_corpus_shape():
    c = load_corpus(None)
    assert c == load_corpus("stories")  # deterministic, seed 0
    text = (c.train + c.val).decode("ascii")  # plain ASCII
    paras = text.strip("\n").split("\n\n")
    assert len(paras) == stories.DEFAULT_STORIES
    assert all(p and "\n" not in p for p in paras)
    firsts = {p.split()[0] for p in paras}
    assert firsts <= NAMES and len(firsts) == len(NAMES)  # every name is a hero somewhere
    # The article's sentences are in it, with both genders.
    assert "Bob is a nice person." in text and "Dan, on the other hand, is evil." in text
    assert "told me over the phone that he had served in the Navy for four long years." in text
    assert "fought the enemy alone and died for his country." in text
    assert "For his contributions, brave" in text and "For her contributions, brave" in text
    assert load_corpus("stories", seed=1).train != c.train


def test_every_sentence_agrees_with_its_subject_and_the_blank_is_the_hero():
    rng = random.Random("test")
    for _ in range(400):
        s = stories.story(rng)
        paragraph = sentences(s.text)
        subject = s.hero
        for sentence in paragraph[:-1]:
            first = sentence.split()[0].rstrip(",")
            if first in NAMES:
                subject = first  # a sentence that names someone is about them
            else:  # else it is about the last person named, by pronoun
                said = set(re.findall(r"\w+", sentence))
                assert GENDERED[gender(subject)] & said, (sentence, s.text)
            other = "f" if gender(subject) == "m" else "m"
            assert not GENDERED[other] & set(re.findall(r"\w+", sentence)), (sentence, s.text)
        blank = re.fullmatch(
            r"For (his|her) (contributions|courage|service), brave (\w+) .*\.", paragraph[-1]
        )
        assert blank and blank.group(3) == s.hero, s.text
        assert blank.group(1) == ("his" if s.gender == "m" else "her")


def test_story_fields_point_at_the_two_tests():
    rng = random.Random("fields")
    lengths = set()
    for _ in range(300):
        s = stories.story(rng)
        words = stories.words(s.text)
        assert words[0] == s.hero and s.gender == gender(s.hero)
        assert s.prompt == s.text[: s.blank] and s.prompt.endswith(", brave")
        assert s.text[s.blank :].startswith(" " + s.hero + " ")
        # the name is said once before the blank: at the start
        assert stories.words(s.prompt).count(s.hero) == 1
        assert s.distance == len(stories.words(s.prompt)) - 1
        assert list(s.between) == [w for w in stories.words(s.prompt)[1:] if w in NAMES]
        assert s.hero not in s.between
        for end, pronoun in s.switches:
            before = sentences(s.text[:end])[-1]
            m = re.fullmatch(r"(\w+), (on the other hand|however), .*\.", before)
            assert m and m.group(1) in s.between, before
            assert s.text[end:].startswith(" " + pronoun + " ")
            assert pronoun == PRONOUN_OF[gender(m.group(1))][0]
        lengths.add(len(s.switches))
    assert lengths == {0, 1, 2}  # short, medium and long stories


def test_held_out_stories_are_long_range_and_not_in_the_corpus():
    held = stories.held_out(0, 100, min_words=30)
    assert len(held) == 100
    assert all(s.distance >= 30 and s.between and s.switches for s in held)
    corpus = stories.generate_stories(0, 2000)
    assert not any(s.text in corpus for s in held)  # a disjoint seed stream
    assert min(s.distance for s in stories.held_out(0, 50, min_words=60)) >= 60
    with pytest.raises(ValueError, match="n and min_words"):
        stories.held_out(0, 0)


def test_answers_regex_marks_exactly_the_blank_names_and_switch_pronouns():
    rng = random.Random("answers")
    for _ in range(200):
        s = stories.story(rng)
        found = []
        for m in re.finditer(stories.ANSWERS, s.text):
            g = m.lastindex or 0
            found.append((m.start(g), m.group(g)))
        expected = [(end + 1, pronoun) for end, pronoun in s.switches] + [(s.blank + 1, s.hero)]
        assert found == expected, s.text


@pytest.mark.slow
def test_nothing_but_memory_tells_the_hero():
    """No shortcut for a model without memory: the people between the name and the blank are
    of either gender whatever the hero's, and the words just before the blank do not depend on
    who the hero is."""
    rng = random.Random("shortcut")
    held = [stories.story(rng, "long") for _ in range(2000)]
    same = sum(gender(s.between[0]) == s.gender for s in held) / len(held)
    assert 0.45 < same < 0.55  # the pronoun "his"/"her" does not single out the hero
    # the last eight words before the blank: their distribution is the same for two halves of
    # the names (a memoryless model reading them learns nothing about which half)
    half = set(sorted(stories.MALE_NAMES)[:16] + sorted(stories.FEMALE_NAMES)[:16])
    tails = {True: {}, False: {}}
    for s in held:
        for w in stories.words(s.prompt)[-8:]:
            d = tails[s.hero in half]
            d[w] = d.get(w, 0) + 1
    for w in ("his", "her", "contributions", "courage", "brave"):
        a = tails[True].get(w, 0) / sum(tails[True].values())
        b = tails[False].get(w, 0) / sum(tails[False].values())
        assert abs(a - b) < 0.02, w
    # the pronoun after a switch is the switched-to person's, independent of the hero's
    after = [p for s in held for _, p in s.switches]
    heroes = [s.gender for s in held for _ in s.switches]
    agree = sum((p == "He") == (g == "m") for p, g in zip(after, heroes)) / len(after)
    assert 0.45 < agree < 0.55
