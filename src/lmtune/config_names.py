"""XTuner-style config names (`internlm2_chat_1_8b_qlora_alpaca_e3`) -> our nearest built-in.

Users arrive with the names their tutorials use: `{model}_{method}_{data}[_variant]_e{epochs}`.
We map each part onto our preset table (model × method × data), carry the epochs over as
`max_epochs`, and say what differs, so `lmtune copy-cfg` / `lmtune train` accept those names.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

METHODS = ("full", "lora", "qlora")
# XTuner data names -> ours (their many dataset configs collapse onto the three data formats).
DATA_ALIASES = {"alpaca": "alpaca", "oasst1": "oasst1", "custom": "custom", "json": "custom"}
# XTuner model names of base (non-chat) checkpoints whose nearest built-in is the chat model.
BASE_TO_CHAT = {"internlm2_1_8b": "internlm2_chat_1_8b", "internlm2_7b": "internlm2_chat_7b",
                "internlm2_5_7b": "internlm2_5_chat_7b", "llama3_8b": "llama3_8b_instruct",
                "qwen2_5_1_5b": "qwen2_5_1_5b_instruct", "qwen2_5_7b": "qwen2_5_7b_instruct"}


@dataclass
class Resolved:
    name: str  # our built-in config
    overrides: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _llava_name(name: str, builtin: list[str]) -> Resolved | None:
    """XTuner's LLaVA names (`llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune`)
    -> our `llava_<llm>_<tower>_<stage>`: the method, epoch and GPU-count parts dropped."""
    parts = name.split("_")
    if parts[0] != "llava" or parts[-1] not in ("pretrain", "finetune"):
        return None
    kept = [p for p in parts if p not in ("qlora", "lora", "full") and not re.fullmatch(r"(e|gpu)\d+", p)]
    ours = "_".join(kept)
    if ours not in builtin:
        return None
    epochs = next((int(p[1:]) for p in parts if re.fullmatch(r"e\d+", p)), None)
    notes = ["the QLoRA / LoRA choices are the config's method, quantization and train_vision_tower keys"]
    return Resolved(ours, {"max_epochs": epochs} if epochs is not None else {}, notes)


def resolve_xtuner_name(name: str, builtin: list[str]) -> Resolved | None:
    """Our nearest built-in for an XTuner-style name, or None if it does not look like one."""
    llava = _llava_name(name, builtin)
    if llava is not None:
        return llava
    m = re.match(r"^(?P<stem>.+?)(?:_e(?P<epochs>\d+))?$", name)
    stem, epochs = m.group("stem"), m.group("epochs")
    parts = stem.split("_")
    where = next((i for i, p in enumerate(parts) if p in METHODS), None)
    if where is None or where == 0:
        return None
    model, method = "_".join(parts[:where]), parts[where]
    data_parts = parts[where + 1:]
    models = sorted({b.rsplit("_", 2)[0] for b in builtin if re.search(r"_(full|lora|qlora)_[a-z0-9]+$", b)})
    notes = []
    ours_model = model if model in models else BASE_TO_CHAT.get(model)
    if ours_model is None:
        near = difflib.get_close_matches(model, models, n=1, cutoff=0.6)
        if not near:
            return None
        ours_model = near[0]
    if ours_model != model:
        notes.append(f"XTuner's config tunes '{model}'; the nearest built-in starts from '{ours_model}' "
                     "(set `model` to change it)")
    data = DATA_ALIASES.get(data_parts[0]) if data_parts else "custom"
    if data is None:
        data = "custom"
        notes.append(f"XTuner's dataset '{'_'.join(data_parts)}' has no built-in preset here; the config reads your "
                     "own conversations (set `datasets` to your file)")
    elif len(data_parts) > 1:
        notes.append(f"XTuner's variant '{'_'.join(data_parts[1:])}' is not modelled; set max_length etc. as needed")
    ours = f"{ours_model}_{method}_{data}"
    if ours not in builtin:
        return None
    overrides = {}
    if epochs is not None:
        overrides["max_epochs"] = int(epochs)
        notes.append(f"max_epochs = {epochs} (from the '_e{epochs}' in the name)")
    return Resolved(ours, overrides, notes)
