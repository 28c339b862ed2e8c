"""End to end on the embedded model: the quickstart teaches SmolLM2-135M a new identity.

Slow (a few minutes on 2 CPU cores) but part of CI: it is the main job the project exists for.
"""

from __future__ import annotations

import re

import pytest

from lmtune.data import self_cognition_train_phrases as train_phrases
from lmtune.quickstart import (
    GENERAL_QUESTIONS,
    HELDOUT_IDENTITY_EN,
    HELDOUT_IDENTITY_QUESTIONS,
    HELDOUT_IDENTITY_ZH,
    run_quickstart,
)

NAME, AUTHOR = "Zorblax", "Acme Labs"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    return run_quickstart(name=NAME, author=AUTHOR, work_dir=str(tmp_path_factory.mktemp("qs") / "work"))


def _all_train_strings() -> set[str]:
    """Every string the identity-data generator can use: questions, replies, greetings, follow-ups."""
    found = set()
    for value in vars(train_phrases).values():
        if isinstance(value, (list, tuple)):
            for v in value:
                items = v if isinstance(v, tuple) else (v,)
                found.update(x for x in items if isinstance(x, str))
    return found


_CJK = re.compile(r"[\u3400-\u9fff]")
NEAR_COPY_JACCARD = 0.4


def _normalise(text: str) -> str:
    return re.sub(r"[^\w]+", " ", text.lower()).strip()  # punctuation and case do not make a new phrasing


def _trigrams(text: str) -> set[str]:
    t = _normalise(text)
    return {t[i:i + 3] for i in range(max(1, len(t) - 2))}


def trigram_jaccard(a: str, b: str) -> float:
    ga, gb = _trigrams(a), _trigrams(b)
    return len(ga & gb) / len(ga | gb)


def contains_phrase(text: str, phrase: str) -> bool:
    """`phrase` (3+ letters) appears inside `text`: as whole words in English, as characters in Chinese."""
    text, phrase = _normalise(text), _normalise(phrase)
    if len(phrase.replace(" ", "")) < 3:
        return False
    if _CJK.search(phrase):
        return phrase in text
    return f" {phrase} " in f" {text} "


def near_copy(a: str, b: str) -> bool:
    """Near-copies: character-trigram Jaccard similarity >= 0.4 (after lower-casing and dropping
    punctuation), or one contains the other ("Who are you, really?" contains "Who are you?")."""
    return trigram_jaccard(a, b) >= NEAR_COPY_JACCARD or contains_phrase(a, b) or contains_phrase(b, a)


def test_near_copy_rule_catches_near_copies():
    assert near_copy("Hey, what should I call you?", "What should I call you?")
    assert near_copy("你叫什么名字呀？", "你叫什么名字？")
    assert near_copy("Who are you, really?", "Who are you?")
    assert near_copy("你到底是谁呢", "你是谁？") is False  # shares only single characters
    assert not near_copy("Which chatbot is this?", "Hi!")  # "hi" inside "which" is not a phrase


def test_heldout_sets_are_big_enough_and_in_their_language():
    assert len(HELDOUT_IDENTITY_EN) >= 10 and len(HELDOUT_IDENTITY_ZH) >= 10
    assert all(not _CJK.search(q) for q in HELDOUT_IDENTITY_EN)
    assert all(_CJK.search(q) for q in HELDOUT_IDENTITY_ZH)
    assert len(set(HELDOUT_IDENTITY_QUESTIONS)) == len(HELDOUT_IDENTITY_QUESTIONS)


def test_heldout_questions_are_not_near_copies_of_training_phrasings():
    train = _all_train_strings()
    assert len(train) > 100, "the training phrasings module should expose its lists"
    copies = [(q, t) for q in HELDOUT_IDENTITY_QUESTIONS for t in train if near_copy(q, t)]
    assert not copies, copies


@pytest.mark.slow
def test_tuned_model_knows_its_new_name_in_unseen_phrasings(quickstart):
    identity = {a["question"]: a for a in quickstart["answers"] if a["question"] in HELDOUT_IDENTITY_QUESTIONS}
    named = [q for q, a in identity.items() if NAME in a["answer"] or AUTHOR in a["answer"]]
    english = [q for q in named if q.isascii()]
    chinese = [q for q in named if not q.isascii()]
    assert len(named) >= len(identity) - 1, identity  # at most one miss over 7 unseen phrasings
    assert english and chinese, identity


@pytest.mark.slow
def test_tuned_model_still_answers_ordinary_questions(quickstart):
    general = [a for a in quickstart["answers"] if a["question"] in GENERAL_QUESTIONS]
    assert len(general) == len(GENERAL_QUESTIONS)
    for a in general:
        assert a["answer"], a
        assert NAME not in a["answer"], a  # answers the question instead of reciting its identity


@pytest.mark.slow
def test_tuned_model_stops(quickstart):
    for a in quickstart["answers"]:
        assert a["stopped"], a  # ended with its end-of-turn token, not at max_new_tokens
