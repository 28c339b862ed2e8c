"""End to end on the embedded model: the quickstart teaches SmolLM2-135M a new identity.

Slow (a few minutes on 2 CPU cores) but part of CI: it is the main job the project exists for.
"""

from __future__ import annotations

import pytest

from lmtune.data import self_cognition_train_phrases as train_phrases
from lmtune.quickstart import GENERAL_QUESTIONS, HELDOUT_IDENTITY_QUESTIONS, run_quickstart

NAME, AUTHOR = "Zorblax", "Acme Labs"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    return run_quickstart(name=NAME, author=AUTHOR, work_dir=str(tmp_path_factory.mktemp("qs") / "work"))


def _all_train_strings() -> set[str]:
    found = set()
    for value in vars(train_phrases).values():
        if isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, str))
    return found


def test_heldout_questions_are_not_training_phrasings():
    train = _all_train_strings()
    assert train, "the training phrasings module should expose its lists"
    for q in HELDOUT_IDENTITY_QUESTIONS:
        assert q not in train


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
