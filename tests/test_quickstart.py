"""End to end on the embedded model: the quickstart teaches SmolLM2-135M a new identity.

The slow tests (one quickstart run, about 3½ minutes on 2 CPU cores, shared by all of them) are part
of CI: it is the main job the project exists for. What they hold the tuned model to:
- its new name in most held-out identity questions, in English and in Chinese separately;
- answers to ordinary questions without the name, compared with the base model's own answers
  (see the floors below for what is held and what one run showed).
"""

from __future__ import annotations

import math
import re

import pytest

from lmtune.config import PACKAGED_DATA
from lmtune.data import self_cognition_train_phrases as train_phrases
from lmtune.data.formats import read_conversations
from lmtune.quickstart import (
    GENERAL_MAX_NEW_TOKENS,
    GENERAL_QUESTIONS,
    HELDOUT_IDENTITY_EN,
    HELDOUT_IDENTITY_QUESTIONS,
    HELDOUT_IDENTITY_ZH,
    NEAR_TIE,
    base_gap,
    first_sentence,
    greedy_replies,
    run_quickstart,
)

NAME, AUTHOR = "Zorblax", "Acme Labs"
# Floors the quickstart must hold on any CPU. Another CPU rounds differently, which moves training
# like another seed, so these sit below the spread of 31 runs of the recipe (2026-11-24,
# docs/workflow.md has the table): of 36 unseen identity questions per language, English named in
# 33-36 and Chinese in 34-36 with seeds 42 and 1-6 on this project's 2-core CPU, 33-36 and 32-36
# with seeds 1-24 on a GPU; of 36 ordinary questions 30-34 (CPU) and 29-34 (GPU) follow the base
# up to its near-ties, and at most two carry the new name (none on the CPU).
IDENTITY_SHARE = 3 / 4  # per language (27 of 36)
GENERAL_FOLLOW_SHARE = 2 / 3  # ordinary answers following the base up to its near-ties (24 of 36)
NAME_IN_ORDINARY_MAX = 2  # ordinary answers allowed to carry the new name (of 36)
# Chinese identity answers in Chinese and whole (33 of 36): in seven CPU runs, 249 of 252 were; the
# others English ("是谁把你做出来的？" -> "Is that right? …"); an earlier recipe's held a broken character.
WHOLE_CHINESE_SHARE = 0.9
STOPPED_SHARE = 0.5  # identity answers that end with their end-of-turn token, per language


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


def _replay_questions() -> list[str]:
    convs = read_conversations(PACKAGED_DATA / "replay_general.jsonl", "openai")
    return [c.messages[0].content for c in convs]


def test_general_questions_are_not_in_the_replay_data():
    replay = _replay_questions()
    assert len(replay) >= 60
    assert len(GENERAL_QUESTIONS) >= 10 and len(set(GENERAL_QUESTIONS)) == len(GENERAL_QUESTIONS)
    copies = [(q, r) for q in GENERAL_QUESTIONS for r in replay if near_copy(q, r)]
    assert not copies, copies


def test_first_sentence():
    assert first_sentence("The capital is Rome.  It is old.") == "the capital is rome."
    assert first_sentence("It costs 3.5 dollars! Cheap.") == "it costs 3.5 dollars!"  # 3.5 is no sentence end
    assert first_sentence("2 + 2 = 4\n\nIn maths…") == "2 + 2 = 4"
    assert first_sentence("我是小明。很高兴认识你") == "我是小明。"
    assert first_sentence("A kitten!") != first_sentence("A baby cat is called a kitten.")


@pytest.mark.slow
def test_tuned_model_knows_its_new_name_in_each_language(quickstart):
    """At least IDENTITY_SHARE of the held-out identity questions get an answer holding the new
    name, in English and in Chinese separately (a good English rate must not hide a poor Chinese one)."""
    identity = [a for a in quickstart["answers"] if a["kind"].startswith("identity")]
    assert len(identity) == len(HELDOUT_IDENTITY_QUESTIONS)
    for lang, questions in (("en", HELDOUT_IDENTITY_EN), ("zh", HELDOUT_IDENTITY_ZH)):
        rows = [a for a in identity if a["kind"] == f"identity_{lang}"]
        named = [a for a in rows if NAME in a["answer"]]
        assert quickstart[f"identity_{lang}"] == [len(named), len(questions)]
        missed = [(a["question"], a["answer"]) for a in rows if NAME not in a["answer"]]
        assert len(named) >= math.ceil(IDENTITY_SHARE * len(questions)), (lang, missed)


@pytest.mark.slow
def test_chinese_identity_answers_are_chinese_and_whole(quickstart):
    """Answers to Chinese questions are in Chinese and, where they end on their own, hold no broken
    characters (U+FFFD, what a model that emits half of a character's bytes decodes to; an answer
    cut at max_new_tokens may end inside a character): at least WHOLE_CHINESE_SHARE of them. English
    answers that end on their own hold no broken characters at all."""
    def whole(a):
        return not (a["stopped"] and "\ufffd" in a["answer"])

    zh = [a for a in quickstart["answers"] if a["kind"] == "identity_zh"]
    good = [a for a in zh if _CJK.search(a["answer"].replace(NAME, "")) and whole(a)]
    assert len(good) >= math.ceil(WHOLE_CHINESE_SHARE * len(zh)), [a for a in zh if a not in good]
    assert all(whole(a) for a in quickstart["answers"] if a["kind"] == "identity_en")


@pytest.mark.slow
def test_ordinary_questions_are_compared_with_the_base_model(quickstart):
    """Ordinary questions: the tuned model answers them, never with its new name, and the quickstart
    reports how many answers have the base model's own first sentence (first line up to the first
    sentence end, case and spacing ignored; see lmtune.quickstart.first_sentence), and how many
    follow the base up to its near-ties (every token of the first sentence within NEAR_TIE of the
    base's favourite). The base answers come from the same weights with the adapter switched off."""
    general = [a for a in quickstart["answers"] if a["kind"] == "general"]
    assert [a["question"] for a in general] == GENERAL_QUESTIONS
    same = [a for a in general if first_sentence(a["answer"]) == first_sentence(a["base"])]
    assert quickstart["general_same"] == [len(same), len(general)]
    follow = [a for a in general if a["base_gap"] <= NEAR_TIE]
    assert quickstart["general_follows_base"] == [len(follow), len(general)]
    assert all(a["follows_base"] for a in same)  # the base's own sentence is within its near-ties
    assert len(follow) >= math.ceil(GENERAL_FOLLOW_SHARE * len(general)), [
        (a["question"], a["answer"], a["base"], a["base_gap"]) for a in general if a not in follow]
    assert all(a["answer"] and a["base"] for a in general)
    leaks = [(a["question"], a["answer"]) for a in general if NAME in a["answer"]]
    assert len(leaks) <= NAME_IN_ORDINARY_MAX, leaks


def test_base_gap_is_zero_for_the_base_models_own_answers_and_not_for_others(smol_dir):
    """The near-tie measure: the base's own greedy answers stray 0 from it; an answer that swaps
    in a word the base would not choose strays far."""
    from lmtune.data.templates import get_template
    from lmtune.models.loader import load_model, load_tokenizer

    tokenizer = load_tokenizer(smol_dir)
    template = get_template("auto", tokenizer)
    model = load_model(smol_dir, dtype="float32").eval()
    questions = GENERAL_QUESTIONS[:4]
    ids: list = []
    answers = greedy_replies(model, tokenizer, template, questions, "You are a helpful assistant.",
                             GENERAL_MAX_NEW_TOKENS, token_ids=ids)
    assert len(ids) == len(questions)
    for q, i in zip(questions, ids):
        assert base_gap(model, tokenizer, template, q, i, "You are a helpful assistant.") == 0.0
    odd = tokenizer("Bananas are purple elephants.", add_special_tokens=False)["input_ids"]
    assert base_gap(model, tokenizer, template, questions[0], odd, "You are a helpful assistant.") > NEAR_TIE
    assert answers[0][0]


@pytest.mark.slow
def test_base_answers_are_the_plain_base_models(quickstart, smol_dir):
    """The reference the comparison uses (adapter switched off) is what the base model itself says."""
    import json
    from pathlib import Path

    from lmtune.data.templates import get_template
    from lmtune.models.loader import load_model, load_tokenizer

    meta = json.loads((Path(quickstart["hf"]) / "lmtune.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(smol_dir)
    model = load_model(smol_dir, dtype="float32").eval()
    base = greedy_replies(model, tokenizer, get_template("auto", tokenizer), GENERAL_QUESTIONS, meta["system"],
                          GENERAL_MAX_NEW_TOKENS)
    assert [text for text, _ in base] == [a["base"] for a in quickstart["answers"] if a["kind"] == "general"]


@pytest.mark.slow
def test_quickstart_writes_what_it_found_into_the_work_dir(quickstart):
    import json
    from pathlib import Path

    from lmtune.quickstart import RESULT_FILE

    saved = json.loads((Path(quickstart["hf"]).parent / RESULT_FILE).read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(quickstart))  # every answer and count, the seed and timings
    assert saved["seed"] == 42 and saved["seconds"] >= saved["train_seconds"] > 0


@pytest.mark.slow
def test_tuned_model_stops(quickstart):
    for lang in ("en", "zh"):  # ended with its end-of-turn token, not at max_new_tokens
        rows = [a for a in quickstart["answers"] if a["kind"] == f"identity_{lang}"]
        ran_on = [a["answer"] for a in rows if not a["stopped"]]
        assert len(rows) - len(ran_on) >= math.ceil(STOPPED_SHARE * len(rows)), (lang, ran_on)


def test_quickstart_claims_only_its_own_work_dir(tmp_path):
    from lmtune.errors import UserError
    from lmtune.quickstart import claim_work_dir

    fresh = tmp_path / "fresh"
    claim_work_dir(fresh, "text", overwrite=False)  # new folder: made and marked
    (fresh / "iter_3").mkdir()  # an earlier quickstart's run
    claim_work_dir(fresh, "text", overwrite=False)  # a re-run may replace it
    with pytest.raises(UserError, match="did not write"):
        claim_work_dir(fresh, "vision", overwrite=False)  # the other quickstart's folder is not its own
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write") as info:
        claim_work_dir(users, "text", overwrite=False)
    assert "--overwrite" in info.value.hint
    assert (users / "notes.txt").read_text() == "mine" and not (users / "quickstart.json").exists()
    claim_work_dir(users, "text", overwrite=True)
    assert (users / "notes.txt").read_text() == "mine"  # --overwrite lets the run replace only its own files


def test_seed_sweep_script_parses_seeds_and_counts_name_leaks():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "quickstart_seeds.py"
    spec = importlib.util.spec_from_file_location("quickstart_seeds", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_seeds("42,1-3") == [42, 1, 2, 3]
    answers = [{"kind": "general", "answer": f"I am {script.NAME}."}, {"kind": "general", "answer": "Paris."},
               {"kind": "identity_en", "answer": f"My name is {script.NAME}."}]
    row = script.summary({"seed": 7, "answers": answers, "identity_en": [1, 1], "identity_zh": [0, 0],
                          "general_same": [1, 2], "general_follows_base": [1, 2], "seconds": 10.4,
                          "train_seconds": 8.6})
    assert row == {"seed": 7, "en": [1, 1], "zh": [0, 0], "same": [1, 2], "follow": [1, 2],
                   "name_in_ordinary": 1, "seconds": 10, "train_seconds": 9}


def test_seed_is_refused_for_the_vision_quickstart(tmp_path, capsys):
    from lmtune.cli import main

    work = tmp_path / "v"
    assert main(["quickstart", "--vision", "--seed", "3", "--work-dir", str(work)]) == 2
    assert "--seed applies to the text quickstart" in capsys.readouterr().err
    assert not work.exists()
