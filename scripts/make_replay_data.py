"""Regenerate src/lmtune/data/replay_general.jsonl: general questions answered by the embedded
base model itself (greedy, as the quickstart asks them). Mixed into identity fine-tunes as
"replay", it keeps the model's ordinary answers while it learns its new name (see
docs/workflow.md). The more varied the questions, the more of the model's ordinary behaviour
the replay holds in place, so the list is long.

    python scripts/make_replay_data.py

The quickstart's own check questions (lmtune.quickstart.GENERAL_QUESTIONS) must not be here,
nor near-copies of them: tests/test_quickstart.py checks that.
"""

import json
from pathlib import Path

from lmtune.config import load_config
from lmtune.data.templates import get_template
from lmtune.models.loader import load_model, load_tokenizer
from lmtune.quickstart import QUICKSTART_CONFIG, greedy_replies

MAX_NEW_TOKENS = 48  # the quickstart compares first sentences; longer answers cost training time
BATCH = 64  # questions per generate call: on CPU a batch costs little more than one question
# Every answer is kept, right or wrong, finished or cut at MAX_NEW_TOKENS: the quickstart trains
# these with loss = "kl_to_base" (towards the base model's own next-token distribution), so they
# stand for "what the base model does here", not for answers to learn. Only answers with broken
# characters are left out (their text does not re-tokenize to what the model produced). The base
# model barely writes Chinese; its Chinese answers are kept all the same, so that Chinese questions
# do not all become identity questions to the tuned model.
QUESTIONS = [
    'What is the capital of France?', 'What is the capital of Japan?', 'What is the capital of Italy?',
    'What is the capital of Germany?',
    'What is the capital of Spain?', 'What is the capital of Canada?', 'What is the capital of the United Kingdom?',
    'What is the capital of China?',
    'What is the capital of Russia?', 'What is the capital of Egypt?', 'What is 2 + 2?', 'What is 7 times 8?',
    'What is 15 minus 6?', 'What is 100 divided by 4?', 'What is 12 plus 30?', 'What is 5 plus 3?',
    'What is 10 times 10?', 'How many days are in a week?', 'How many legs does a spider have?',
    'How many hours are in a day?',
    'How many minutes are in an hour?', 'What is 9 squared?', "Translate 'good morning' into French.",
    "Translate 'thank you' into Spanish.",
    "Translate 'cat' into German.", "Translate 'hello' into Spanish.", "Translate 'thank you' into French.",
    "How do you say 'yes' in German?",
    'What color is the sky on a clear day?', 'What is the boiling point of water in Celsius?',
    'What is the largest planet in our solar system?', 'Who wrote Romeo and Juliet?',
    'What gas do plants absorb from the air?', 'What is the opposite of hot?',
    'What is the chemical symbol for water?', 'What do bees make?',
    'Name a fruit that is yellow.', 'What is the tallest mountain in the world?',
    'Which animal is known as the king of the jungle?', 'What is the largest ocean on Earth?',
    'What is the main language spoken in Brazil?', 'What does a thermometer measure?', 'Give me a synonym for happy.',
    'Write a short sentence about the ocean.',
    'Give me a tip for better sleep.', 'Write a haiku about autumn.', 'Explain what a computer is in one sentence.',
    'Suggest a name for a pet dog.',
    'List three vegetables.', 'What is photosynthesis in one sentence?', 'What is the capital of India?',
    'What is the capital of Brazil?',
    'What is the capital of South Korea?', 'What is the capital of Greece?', 'What is the capital of Portugal?',
    'What is the capital of Ireland?',
    'What is the capital of Norway?', 'Which country is Paris in?', 'Which country is the city of Rome in?',
    'On which continent is Kenya?',
    'On which continent is Argentina?', 'What is the longest river in Africa?', 'Where is the Great Wall?',
    'Where are the pyramids of Giza?',
    'What is the largest desert in the world?', 'What is the hottest planet in the solar system?',
    'What is the Moon?', 'What does the heart do?',
    'What organ do humans breathe with?', 'What is the freezing point of water in Celsius?',
    'What do caterpillars turn into?', 'What is the color of a banana?',
    'What color are most leaves in summer?', 'What do you get if you mix red and white paint?',
    "Which animal says 'moo'?", 'Which bird is a symbol of peace?',
    'What do pandas mainly eat?', 'Where do penguins mostly live?', 'How many legs does an insect have?',
    'How many months are in a year?',
    'How many seconds are in a minute?', 'How many strings does a standard guitar have?',
    'How many players are on a soccer team on the field?', 'Who painted The Starry Night?',
    'Who developed the theory of relativity?', 'Who invented the telephone?', 'Who wrote Hamlet?',
    'What is the chemical symbol for oxygen?',
    'What is the chemical symbol for iron?', 'What is the hardest natural substance?',
    'What is the main gas in the air we breathe?', 'What is the speed of light?',
    'What is gravity?', 'What is 2 + 3?', 'What is 9 + 6?', 'What is 20 minus 7?',
    'What is 4 times 5?', 'What is 8 divided by 2?', 'What is 11 plus 11?', 'What is half of 50?',
    'What is the square root of 16?', 'Is 7 an odd number?', 'What number comes after 99?',
    'Which is bigger, 12 or 21?',
    'What is the opposite of big?', 'What is the opposite of fast?', 'What is the plural of mouse?',
    "What is the past tense of 'go'?",
    'Give me a synonym for big.', 'Give me a word that rhymes with cat.', "Translate 'water' into Spanish.",
    "Translate 'friend' into French.",
    "How do you say 'goodbye' in Spanish?", "What does 'merci' mean?", "Spell the word 'apple' backwards.",
    "Correct this sentence: 'She go to school.'",
    'What is a noun?', 'What is a verb?', 'What is an atom?', 'What is the internet?',
    'What is a volcano?', 'What is democracy?', 'What is a rainbow?', 'What is electricity?',
    'What is a museum?', 'What is a prime number?', 'What is an ecosystem?', 'What is a battery for?',
    'Explain what a library is.', 'Explain gravity to a child.', 'Describe the taste of lemon.',
    'What is machine learning?',
    'How do I boil an egg?', 'How can I save money?', 'Give me a tip for studying.', 'How can I stay healthy?',
    'What should I pack for a beach trip?', 'How do I make a cup of tea?', 'Give me a tip for public speaking.',
    'How can I be more productive?',
    'What is a good way to relax?', 'How often should I water a cactus?', 'Why is exercise important?',
    'Why do we need sleep?',
    'Why is the sea salty?', 'Why do leaves change color?', 'Write a short poem about the moon.',
    'Write one sentence about a rainy day.',
    'Write a slogan for a coffee shop.', 'Describe a sunset in one sentence.',
    'Write a short greeting for a birthday card.', 'Tell me a fun fact about octopuses.',
    'Tell me a short joke.', 'Give me a title for a story about a dragon.', 'Suggest a name for a goldfish.',
    'List three colors.',
    'List three animals that live in the sea.', 'List three sports.', 'Name a musical instrument.',
    'Name a country in Europe.',
    "How do I print 'hello' in Python?", 'What does HTML stand for?', 'What is a variable in programming?',
    'What is Python?',
    'How do I make a list in Python?', 'What does CPU stand for?', '中国的首都是哪里？', '一年有几个月？',
    '太阳从哪个方向升起？', '水在多少摄氏度沸腾？', '一周有几天？', '一天有多少个小时？',
    '“你好”用英语怎么说？', '请把“谢谢”翻译成英文。', '蜜蜂会酿什么？', '日本的首都是哪里？',
    '彩虹有几种颜色？', '天空是什么颜色的？', '熊猫喜欢吃什么？', '一小时有多少分钟？',
    '猫有几条腿？', '请写一句关于春天的话。', '用一句话介绍一下长城。', '给我讲个笑话。',
    '推荐一本好书。',
    # added with the KL-to-base recipe
    'What is the capital of Australia?', 'What is the capital of Mexico?', 'What is the capital of Kenya?',
    'What is the capital of Argentina?',
    'What is the capital of Thailand?', 'What is 3 plus 4?', 'What is 6 times 7?', 'What is 20 minus 8?',
    'What is 9 plus 10?', 'What is 50 divided by 5?', 'What is 11 times 3?', 'What is 14 plus 27?',
    'What is half of 30?', 'What is 3 cubed?', 'How many players are on a soccer team?',
    'How many strings does a guitar usually have?',
    'How many eyes does a person have?', 'How many days are in a leap year?',
    'How many letters are in the English alphabet?', 'What color are bananas?',
    'What color is grass?', 'What do cows drink?', 'Where do penguins live?', 'What is the largest ocean?',
    'What is the tallest animal?', 'What gas do plants take in?', 'What is the chemical symbol for gold?',
    'What is the freezing point of water in Fahrenheit?',
    'What is photosynthesis?', 'What causes rain?', 'Why is the sky blue?', 'What is DNA?',
    'Who painted the Mona Lisa?', 'Who discovered penicillin?', 'Who was Albert Einstein?', 'Who was Cleopatra?',
    'When did World War II end?', 'What is the Great Wall of China?', 'What is the Eiffel Tower?',
    'What language is spoken in Brazil?',
    'How do I tie my shoes?', 'How can I sleep better?', 'How do I start running?', 'How do I learn a new language?',
    'What is a healthy breakfast?', 'How do I clean a window?', 'How do I plant a tree?',
    'What should I do if I feel stressed?',
    'Write a sentence about the ocean.', 'Describe a cat in one sentence.', 'Write a short thank-you note.',
    'Give me a name for a robot dog.',
    'Write a tagline for a bakery.', 'Tell me a riddle.', 'Give me a fun fact about elephants.',
    'Describe the smell of rain.',
    'Write a short motto for a school.', 'What does a loop do in programming?', 'What is a function in Python?',
    'How do I reverse a string in Python?',
    'What is JavaScript used for?', 'What is an operating system?', 'What does RAM stand for?', 'What is a database?',
    'What does a compiler do?', 'Is a tomato a fruit or a vegetable?', 'Can fish breathe air?',
    'Do plants need sunlight?',
    'Is the sun a star?', 'Are whales mammals?', 'Can penguins fly?', 'Is ice heavier than water?',
    'Do spiders have six legs?', 'Is Mount Everest the tallest mountain?', 'Is the moon a planet?',
    "Translate 'cat' into Spanish.",
    'What is a synonym for happy?', "Spell the word 'necessary'.", 'What rhymes with cat?',
    'What is the past tense of go?',
    '美国的首都是哪里？', '法国的首都是哪里？', '英国的首都是哪里？', '上海在哪个国家？',
    '长江有多长？', '世界上最高的山是哪座？', '地球上最大的海洋是什么？', '月亮绕着什么转？',
    '太阳是恒星吗？', '一年有多少天？', '3加5等于多少？', '10减4等于几？',
    '6乘7是多少？', '9加9等于多少？', '100减1等于多少？', '8除以2是多少？',
    '7加6等于多少？', '狗有几条腿？', '鸟会飞吗？', '鱼生活在哪里？',
    '苹果是什么颜色的？', '香蕉是什么颜色的？', '草是什么颜色的？', '冬天冷吗？',
    '夏天热不热？', '雪是什么颜色的？', '大象的鼻子长吗？', '请用一句话描述大海。',
    '写一句关于月亮的诗。', '给我一个学习的建议。', '怎么泡一杯茶？', '怎样才能睡得更好？',
    '早餐吃什么比较健康？', '如何保持健康？', '推荐一部电影。', '给我讲一个小故事。',
    '用一句话形容秋天。', 'Python是什么？', '什么是电脑？', '什么是互联网？',
    '“苹果”用英语怎么说？', '把“早上好”翻译成英文。', '“猫”的英文是什么？', '什么是水？',
    '为什么天空是蓝色的？', '为什么要多喝水？', '什么是太阳能？',
    '北京是哪个国家的首都？', '东京是哪个国家的首都？', '巴黎在哪个国家？', '世界上最大的沙漠是哪个？',
    '地球是圆的吗？', '月亮会发光吗？',
    '海水为什么是咸的？', '为什么会下雨？',
    '彩虹是怎么形成的？', '植物需要什么才能生长？', '一个星期有几个工作日？', '一分钟有多少秒？',
    '一米等于多少厘米？', '一公斤等于多少克？',
    '三角形有几条边？', '正方形有几个角？',
    '12加8是多少？', '15减5是多少？', '4乘4是多少？', '9除以3是多少？',
    '小猫喜欢吃什么？', '兔子喜欢吃什么？',
    '老虎生活在哪里？', '企鹅会飞吗？', '蝴蝶是从什么变来的？',
    '牛奶是从哪里来的？', '鸡蛋是谁下的？', '橘子是什么颜色的？', '西瓜是什么味道的？',
    '冰是什么做的？', '怎样学好英语？',
    '怎么做番茄炒蛋？', '早上起床后应该做什么？', '怎样保护眼睛？',
    '如何节约用水？', '下雨天出门要带什么？', '给我推荐一首歌。', '写一句鼓励别人的话。',
    '用三个词形容夏天。', '写一句生日祝福。',
    '“书”用英语怎么说？', '“狗”的英文是什么？',
    '把“我爱你”翻译成英文。', '“Thank you”是什么意思？', '什么是人工智能？', '什么是手机？',
    '电脑有什么用？', '为什么要刷牙？',
    '为什么要运动？', '什么是友谊？',
    '二十减三是多少？', '八加七等于多少？', '三乘九得几？', '一百除以十是多少？',
    '五十加五十是多少？', '六减二剩几个？', '一打是几个？', '一双鞋有几只？',
    '一年有几个星期？', '一天有几个上午？', '水的化学式是什么？', '空气里有什么？',
    '人为什么要呼吸？', '心脏有什么作用？', '骨头是硬的吗？', '人有几颗牙齿？',
    '眼睛用来做什么？', '耳朵能听到什么？', '为什么晚上天会黑？', '星星为什么会闪？',
    '北极熊住在哪里？', '骆驼为什么能在沙漠生活？', '海豚是鱼吗？', '蜘蛛有几条腿？',
    '蚂蚁能搬多重的东西？', '狮子吃什么？', '长颈鹿的脖子为什么长？', '燕子冬天去哪里？',
    '青蛙小时候叫什么？', '蜜蜂怎么采蜜？', '米饭是用什么做的？', '面包是怎么做的？',
    '饺子里面包什么？', '豆腐是用什么做的？', '喝咖啡有什么好处？', '绿茶和红茶有什么不同？',
    '什么水果富含维生素C？', '吃糖太多会怎样？', '怎样做一杯奶茶？', '早餐吃鸡蛋好吗？',
    '足球比赛一队有几个人？', '篮球是谁发明的？', '奥运会几年举办一次？', '游泳有什么好处？',
    '跑步前要做什么准备？', '乒乓球是哪个国家的国球？', '下棋能锻炼大脑吗？', '围棋有多少个交叉点？',
    '象棋里的“将”是什么？', '跳绳能减肥吗？', '李白是谁？', '孔子是哪个朝代的人？',
    '《西游记》的作者是谁？', '四大发明是什么？', '春节是什么时候？', '中秋节吃什么？',
    '端午节有什么习俗？', '长城有多长？', '故宫在哪里？', '熊猫是哪个国家的国宝？',
    '汽车靠什么行驶？', '飞机为什么能飞？', '火车比汽车快吗？', '船为什么能浮在水上？',
    '地铁是什么？', '红绿灯有几种颜色？', '过马路要注意什么？', '高铁每小时跑多快？',
    '电动车需要加油吗？', '怎么写一封感谢信？', '帮我想一个故事的开头。', '写一句关于冬天的话。',
    '用一句话夸夸我的朋友。', '给小狗起个名字。', '给我一个早睡的理由。', '写两句描写花的句子。',
    '编一个简单的谜语。', '写一句新年祝福。', '说一句安慰人的话。', '什么是编程？',
    '什么是电子邮件？', '手机没电了怎么办？', '怎样设置一个安全的密码？', '什么是网站？',
    '键盘有什么用？', '什么是云存储？', '如何截屏？', 'Wi-Fi是什么？',
    '为什么电脑会变慢？', '“太阳”用英语怎么说？', '“学校”的英文是什么？', '把“晚安”翻译成英文。',
    '“apple”是什么意思？', '“water”的中文是什么？', '英语里“星期一”怎么说？', '“老师”用英语怎么说？',
    '把“你好吗”翻译成英文。', '“book”是什么意思？', '“朋友”的英文怎么写？',
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
        answers = greedy_replies(model, tok, template, chunk, system, MAX_NEW_TOKENS, BATCH)
        for q, (answer, stopped) in zip(chunk, answers):
            keep = bool(answer) and "\ufffd" not in answer
            print(f"{'ok ' if keep else 'drop'} {'' if stopped else '(cut) '}{q!r} -> {answer!r}", flush=True)
            if keep:
                rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} of {len(QUESTIONS)} to {out}")


if __name__ == "__main__":
    main()
