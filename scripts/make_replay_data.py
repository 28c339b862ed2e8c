"""Regenerate src/lmtune/data/replay_general.jsonl: general questions answered by the embedded
base model itself (greedy, as the quickstart asks them). Mixed into identity fine-tunes as
"replay", it keeps the model's ordinary answers while it learns its new name (see
docs/workflow.md). The more varied the questions, the more of the model's ordinary behaviour
the replay holds in place, so the list is long (answers that do not end within MAX_NEW_TOKENS are
dropped: long rambles cost training time and hold little).

    python scripts/make_replay_data.py

The quickstart's own check questions (lmtune.quickstart.GENERAL_QUESTIONS) must not be here,
nor near-copies of them: tests/test_quickstart.py checks that.
"""

import json
import re
from pathlib import Path

from lmtune.config import load_config
from lmtune.data.templates import get_template
from lmtune.models.loader import load_model, load_tokenizer
from lmtune.quickstart import QUICKSTART_CONFIG, greedy_replies

MAX_NEW_TOKENS = 96
BATCH = 64  # questions per generate call: on CPU a batch costs little more than one question
# (question, words one of which the answer must contain to be kept ("a|b"), or None). Answers the
# base model gets wrong are left out: replay should keep what the model does well, not teach its
# mistakes. The base model barely writes Chinese: most Chinese questions are dropped, the few it
# answers acceptably (often in English) are kept, so that Chinese questions do not all become
# identity questions to the tuned model.
QUESTIONS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of the United Kingdom?", "London"), ("What is the capital of China?", "Beijing"),
    ("What is the capital of Russia?", "Moscow"), ("What is the capital of Egypt?", "Cairo"),
    ("What is 2 + 2?", "4"), ("What is 7 times 8?", "56"), ("What is 15 minus 6?", "9"),
    ("What is 100 divided by 4?", "25"), ("What is 12 plus 30?", "42"), ("What is 5 plus 3?", "8"),
    ("What is 10 times 10?", "100"), ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"), ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"), ("What is 9 squared?", "81"),
    ("Translate 'good morning' into French.", "Bonjour"), ("Translate 'thank you' into Spanish.", "Gracias"),
    ("Translate 'cat' into German.", "Katze"), ("Translate 'hello' into Spanish.", "Hola"),
    ("Translate 'thank you' into French.", "Merci"), ("How do you say 'yes' in German?", "Ja"),
    ("What color is the sky on a clear day?", "blue"), ("What is the boiling point of water in Celsius?", "100"),
    ("What is the largest planet in our solar system?", "Jupiter"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What gas do plants absorb from the air?", "carbon dioxide"), ("What is the opposite of hot?", "cold"),
    ("What is the chemical symbol for water?", "H2O"), ("What do bees make?", "honey"),
    ("Name a fruit that is yellow.", "anana"), ("What is the tallest mountain in the world?", "Everest"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the main language spoken in Brazil?", "Portuguese"), ("What does a thermometer measure?", "temperature"),
    ("Give me a synonym for happy.", None), ("Write a short sentence about the ocean.", None),
    ("Give me a tip for better sleep.", None), ("Write a haiku about autumn.", None),
    ("Explain what a computer is in one sentence.", None), ("Suggest a name for a pet dog.", None),
    ("List three vegetables.", None), ("What is photosynthesis in one sentence?", None),
    # facts
    ("What is the capital of India?", "Delhi"),
    ("What is the capital of Brazil?", "Bras"), ("What is the capital of South Korea?", "Seoul"),
    ("What is the capital of Greece?", "Athens"), ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Ireland?", "Dublin"), ("What is the capital of Norway?", "Oslo"),
    ("Which country is Paris in?", "France"), ("Which country is the city of Rome in?", "Italy"),
    ("On which continent is Kenya?", "Africa"), ("On which continent is Argentina?", "America"),
    ("What is the longest river in Africa?", "Nile"), ("Where is the Great Wall?", "China"),
    ("Where are the pyramids of Giza?", "Egypt"), ("What is the largest desert in the world?", None),
    ("What is the hottest planet in the solar system?", "Venus"), ("What is the Moon?", None),
    ("What does the heart do?", "blood"), ("What organ do humans breathe with?", "lung"),
    ("What is the freezing point of water in Celsius?", "0"), ("What do caterpillars turn into?", "butterfl"),
    ("What is the color of a banana?", "yellow"), ("What color are most leaves in summer?", "green"),
    ("What do you get if you mix red and white paint?", "pink"), ("Which animal says 'moo'?", "cow"),
    ("Which bird is a symbol of peace?", "dove"),
    ("What do pandas mainly eat?", "bamboo"), ("Where do penguins mostly live?", None),
    ("How many legs does an insect have?", "6"), ("How many months are in a year?", "12"),
    ("How many seconds are in a minute?", "60"),
    ("How many strings does a standard guitar have?", "6"), ("How many players are on a soccer team on the field?", "11"),
    ("Who painted The Starry Night?", "Gogh"), ("Who developed the theory of relativity?", "Einstein"),
    ("Who invented the telephone?", "Bell"), ("Who wrote Hamlet?", "Shakespeare"),
    ("What is the chemical symbol for oxygen?", "O"), ("What is the chemical symbol for iron?", "Fe"),
    ("What is the hardest natural substance?", "diamond"), ("What is the main gas in the air we breathe?", "nitrogen"),
    ("What is the speed of light?", None), ("What is gravity?", None),
    # arithmetic and numbers
    ("What is 2 + 3?", "5"), ("What is 9 + 6?", "15"), ("What is 20 minus 7?", "13"),
    ("What is 4 times 5?", "20"), ("What is 8 divided by 2?", "4"), ("What is 11 plus 11?", "22"),
    ("What is half of 50?", "25"), ("What is the square root of 16?", "4"), ("Is 7 an odd number?", "odd"),
    ("What number comes after 99?", "100"), ("Which is bigger, 12 or 21?", "21"),
    # language
    ("What is the opposite of big?", "small"), ("What is the opposite of fast?", "slow"),
    ("What is the plural of mouse?", "mice"), ("What is the past tense of 'go'?", "went"),
    ("Give me a synonym for big.", None), ("Give me a word that rhymes with cat.", None),
    ("Translate 'water' into Spanish.", "agua"), ("Translate 'friend' into French.", "ami"),
    ("How do you say 'goodbye' in Spanish?", "adi"), ("What does 'merci' mean?", "thank"),
    ("Spell the word 'apple' backwards.", None), ("Correct this sentence: 'She go to school.'", "goes"),
    # definitions
    ("What is a noun?", None), ("What is a verb?", None), ("What is an atom?", None),
    ("What is the internet?", None), ("What is a volcano?", None), ("What is democracy?", None),
    ("What is a rainbow?", None), ("What is electricity?", None), ("What is a museum?", None),
    ("What is a prime number?", None), ("What is an ecosystem?", None), ("What is a battery for?", None),
    ("Explain what a library is.", None), ("Explain gravity to a child.", None),
    ("Describe the taste of lemon.", None), ("What is machine learning?", None),
    # everyday help
    ("How do I boil an egg?", None), ("How can I save money?", None), ("Give me a tip for studying.", None),
    ("How can I stay healthy?", None), ("What should I pack for a beach trip?", None),
    ("How do I make a cup of tea?", None), ("Give me a tip for public speaking.", None),
    ("How can I be more productive?", None), ("What is a good way to relax?", None),
    ("How often should I water a cactus?", None), ("Why is exercise important?", None),
    ("Why do we need sleep?", None), ("Why is the sea salty?", None), ("Why do leaves change color?", None),
    # writing
    ("Write a short poem about the moon.", None), ("Write one sentence about a rainy day.", None),
    ("Write a slogan for a coffee shop.", None), ("Describe a sunset in one sentence.", None),
    ("Write a short greeting for a birthday card.", None), ("Tell me a fun fact about octopuses.", None),
    ("Tell me a short joke.", None), ("Give me a title for a story about a dragon.", None),
    ("Suggest a name for a goldfish.", None), ("List three colors.", None), ("List three animals that live in the sea.", None),
    ("List three sports.", None), ("Name a musical instrument.", None), ("Name a country in Europe.", None),
    # code
    ("How do I print 'hello' in Python?", "print"), ("What does HTML stand for?", "Markup"),
    ("What is a variable in programming?", None), ("What is Python?", None),
    ("How do I make a list in Python?", None), ("What does CPU stand for?", "Processing"),
    # Chinese (the base answers few acceptably; kept only where it does)
    ("中国的首都是哪里？", "北京|Beijing"), ("一年有几个月？", "12"), ("太阳从哪个方向升起？", "east|东"),
    ("水在多少摄氏度沸腾？", "100"), ("一周有几天？", "7"), ("一天有多少个小时？", "24"),
    ("“你好”用英语怎么说？", "hello"), ("请把“谢谢”翻译成英文。", "thank"), ("蜜蜂会酿什么？", "honey|蜂蜜"),
    ("日本的首都是哪里？", "东京|Tokyo"), ("彩虹有几种颜色？", "7|七"), ("天空是什么颜色的？", "blue|蓝"),
    ("熊猫喜欢吃什么？", "bamboo|竹"), ("一小时有多少分钟？", "60"), ("猫有几条腿？", "4|四"),
    ("请写一句关于春天的话。", None), ("用一句话介绍一下长城。", None),
    ("给我讲个笑话。", None), ("推荐一本好书。", None),
]


def main():
    tok = load_tokenizer("smollm2-135m-instruct")
    template = get_template("auto", tok)
    model = load_model("smollm2-135m-instruct", dtype="float32").eval()
    out = Path(__file__).resolve().parents[1] / "src/lmtune/data/replay_general.jsonl"
    system = load_config(QUICKSTART_CONFIG).system  # the prompt the quickstart trains and asks with
    rows = []
    for i in range(0, len(QUESTIONS), BATCH):
        chunk = QUESTIONS[i:i + BATCH]
        answers = greedy_replies(model, tok, template, [q for q, _ in chunk], system, MAX_NEW_TOKENS, BATCH)
        rows += keep_good(chunk, answers)
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} of {len(QUESTIONS)} to {out}")


def keep_good(questions, answers) -> list[dict]:
    rows = []
    for (q, expected), (answer, stopped) in zip(questions, answers):
        right = expected is None or any(w.lower() in answer.lower() for w in expected.split("|"))
        clean = answer and "\ufffd" not in answer and not re.search(r"(.{6,}?)\1\1", answer)  # no broken bytes, no loops
        keep = stopped and right and clean
        print(f"{'ok ' if keep else 'drop'} {q!r} -> {answer!r}", flush=True)
        if keep:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    return rows


if __name__ == "__main__":
    main()
