"""`lmtune chat`: one-shot --prompt, piped stdin (multi-turn, /reset, EXIT), bad model paths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_serve_common import ENV, ROOT, tiny_model  # noqa: E402,F401

from lmtune.serve.engine import Engine  # noqa: E402


def lmtune(*args, stdin: str | None = None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmtune.cli", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def engine(tiny_model):  # noqa: F811
    return Engine.load(str(tiny_model))


def test_prompt_prints_one_answer_and_exits(tiny_model, engine):  # noqa: F811
    expected = engine.generate([{"role": "user", "content": "hello there"}], max_new_tokens=6).text
    p = lmtune("chat", str(tiny_model), "--prompt", "hello there", "--max-new-tokens", "6")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected + "\n"


def test_piped_stdin_is_a_multi_turn_conversation(tiny_model, engine):  # noqa: F811
    kw = dict(max_new_tokens=5)
    a1 = engine.generate([{"role": "user", "content": "first"}], **kw).text
    a2 = engine.generate([{"role": "user", "content": "first"}, {"role": "assistant", "content": a1},
                          {"role": "user", "content": "second"}], **kw).text
    a2_alone = engine.generate([{"role": "user", "content": "second"}], **kw).text
    assert a2 != a2_alone  # otherwise the test could not see the history
    stdin = "first\nsecond\n\n/reset\nsecond\nRESET\nEXIT\nnever answered\n"
    p = lmtune("chat", str(tiny_model), "--max-new-tokens", "5", stdin=stdin)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{a1}\n{a2}\n{a2_alone}\n"


def test_eof_ends_the_session(tiny_model):  # noqa: F811
    p = lmtune("chat", str(tiny_model), "--max-new-tokens", "2", stdin="")
    assert p.returncode == 0 and p.stdout == ""


def test_system_prompt_flag_changes_the_prompt(tiny_model, engine):  # noqa: F811
    expected = engine.generate([{"role": "user", "content": "hi"}], system="You are a pirate.",
                               max_new_tokens=5).text
    p = lmtune("chat", str(tiny_model), "--system", "You are a pirate.", "--prompt", "hi", "--max-new-tokens", "5")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected + "\n"


def test_chat_on_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    p = lmtune("chat", str(tmp_path), "--prompt", "hi")
    assert p.returncode == 2
    assert "is a folder but not a model" in p.stderr and "config.json" in p.stderr
    assert "Traceback" not in p.stderr
    assert p.stdout == ""


def test_chat_with_a_missing_adapter(tiny_model, tmp_path):  # noqa: F811
    p = lmtune("chat", str(tiny_model), "--adapter", str(tmp_path / "nope"), "--prompt", "hi")
    assert p.returncode == 2
    assert "adapter folder" in p.stderr and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr


def test_chat_with_an_unknown_template(tiny_model):  # noqa: F811
    p = lmtune("chat", str(tiny_model), "--prompt-template", "chatmll", "--prompt", "hi")
    assert p.returncode == 2
    assert "unknown prompt template" in p.stderr and "chatml" in p.stderr
    assert "Traceback" not in p.stderr
