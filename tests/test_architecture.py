"""The shape of the code: data flows forward, no import cycles, config names users bring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmtune"


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the lmtune modules it imports, at module level or inside functions alike."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v):
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if not state.get(u):
            found = visit(u)
            if found:
                return found
    return None


def test_no_two_modules_import_each_other():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("upstream, downstream", [("lmtune.data", "lmtune.train"), ("lmtune.serve", "lmtune.train"),
                                                  ("lmtune.models", "lmtune.train"),
                                                  ("lmtune.data", "lmtune.serve")])
def test_data_flows_forward(upstream, downstream):
    graph = import_graph()
    bad = [(m, d) for m, deps in graph.items() if m.startswith(upstream) for d in deps if d.startswith(downstream)]
    assert not bad, bad


@pytest.mark.parametrize("name, ours, epochs", [
    ("internlm2_chat_1_8b_qlora_alpaca_e3", "internlm2_chat_1_8b_qlora_alpaca", 3),
    ("internlm2_1_8b_qlora_alpaca_e3", "internlm2_chat_1_8b_qlora_alpaca", 3),
    ("llama3_8b_instruct_qlora_alpaca_zh_e1", "llama3_8b_instruct_qlora_alpaca", 1),
    ("qwen2_5_7b_instruct_lora_oasst1_512_e2", "qwen2_5_7b_instruct_lora_oasst1", 2),
])
def test_xtuner_names_resolve_to_our_nearest_config(name, ours, epochs, tmp_path, capsys):
    from lmtune.cli import main
    from lmtune.config import load_config

    cfg = load_config(name)
    assert cfg._source == f"built-in:{ours}" and cfg.max_epochs == epochs
    assert f"using the built-in '{ours}'" in capsys.readouterr().err
    assert main(["copy-cfg", name, str(tmp_path)]) == 0
    copied = tmp_path / f"{name}_copy.py"
    assert f"max_epochs = {epochs}" in copied.read_text() and ours in copied.read_text()
    assert load_config(str(copied)).max_epochs == epochs


def test_unrelated_names_are_still_refused():
    from lmtune.config import load_config
    from lmtune.errors import UserError

    with pytest.raises(UserError, match="neither a file nor a built-in"):
        load_config("gpt2_sparkles_lora_alpaca_e3")
