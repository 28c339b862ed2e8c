"""The built-in model × method × data configs, from one table.

`lmtune list-cfg` lists them and `lmtune copy-cfg NAME DIR` writes NAME's text (rendered here) as a
plain, self-explaining file to edit; `lmtune train NAME` reads the same text. Add a model, a method
or a data kind by adding a row below. Hand-written configs (e.g. the quickstart's) are files beside
this module.
"""

from __future__ import annotations

# Instruct/chat models are trained with the tokenizer's own chat template (prompt_template = "auto"):
# it is what the checkpoint was tuned with and what every other tool renders, default system prompt
# (Qwen2.5) and date header (Llama 3.1+) included. Named templates stay available for users who set one.
MODELS = {
    # name: (hub id, max_length, lr full, lr lora)
    "qwen2_5_1_5b_instruct": ("Qwen/Qwen2.5-1.5B-Instruct", 2048, 1e-5, 2e-4),
    "qwen2_5_7b_instruct": ("Qwen/Qwen2.5-7B-Instruct", 2048, 1e-5, 2e-4),
    "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", 2048, 1e-5, 2e-4),
    "llama3_2_3b_instruct": ("meta-llama/Llama-3.2-3B-Instruct", 2048, 1e-5, 2e-4),
    "internlm2_chat_1_8b": ("internlm/internlm2-chat-1_8b", 2048, 1e-5, 2e-4),
    "internlm2_chat_7b": ("internlm/internlm2-chat-7b", 2048, 1e-5, 2e-4),
    "internlm2_5_chat_7b": ("internlm/internlm2_5-7b-chat", 2048, 1e-5, 2e-4),
}
# Extra lines for a model family's docstring.
NOTES = {
    "internlm2": (
        "\nlmtune loads InternLM2-family checkpoints natively (no trust_remote_code): the fused wqkv is split\n"
        "into a Llama-layout model at load time. Export writes the native layout by default, or the InternLM2\n"
        "layout with `--save-format internlm2`; see docs/internlm2.md.\n"
    ),
}
DATA = {
    # name: (path: a file, folder or hub data set id, format, what it is, hub split or None)
    "custom": ("data/my_conversations.jsonl", "openai",
               "your own conversations, one JSON object per line: {\"messages\": [...]}", None),
    "alpaca": ("tatsu-lab/alpaca", "alpaca",
               "the hub data set (downloaded once; or a local file / save_to_disk folder), see docs/data.md", "train"),
    "oasst1": ("timdettmers/openassistant-guanaco", "oasst1",
               "guanaco-style '### Human: ... ### Assistant: ...' text from the hub, see docs/data.md", "train"),
}
METHODS = {
    "full": dict(method="full", quantization="none", batch_size=1, accumulative_counts=16, gc="auto"),
    "lora": dict(method="lora", quantization="none", batch_size=1, accumulative_counts=16, gc="auto"),
    "qlora": dict(method="lora", quantization="nf4", batch_size=1, accumulative_counts=16, gc="auto"),
}

TEMPLATE = '''"""{title}
{note}
Copy and edit: `lmtune copy-cfg {name} ./config`, then change PART 1 (model path, data path,
system prompt, evaluation questions) and run `lmtune train ./config/{name}_copy.py`.
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = {model!r}  # a local folder, a hub id or a .gguf file
datasets = [{data_entry}]  # {data_note}
prompt_template = 'auto'  # the tokenizer's own chat template; or a name: chatml, llama3_chat, ...
system = None  # e.g. "You are a helpful assistant."
max_length = {max_length}
pack_to_max_length = True

evaluation_freq = 200
evaluation_inputs = ["Please introduce yourself.", "请你介绍一下你自己"]

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
method = {method!r}
quantization = {quantization!r}{quant_note}
{lora_block}torch_dtype = "auto"
gradient_checkpointing = {gc!r}  # "auto": on a GPU, only the layers the memory needs; True: all; False: none

#######################################################################
#                           PART 3  Data                              #
#######################################################################
num_proc = 4
shuffle_before_pack = True

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = {lr}
batch_size = {batch_size}  # per device, in packed rows
accumulative_counts = {accumulative_counts}
batch_tokens = "auto"  # on a GPU: micro-batches as large as memory allows (same rows per step); None: batch_size rows
max_epochs = 3
max_norm = 1.0
warmup_ratio = 0.03
weight_decay = 0.0

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
save_steps = 500
save_total_limit = 2
logging_steps = 10
seed = 42
'''



# Preference optimisation (docs/preference.md): objective -> (methods, lr full, lr lora, extra lines)
PREFERENCE = {
    "dpo": (("full", "lora", "qlora"), 5e-7, 5e-6,
            'dpo_loss = "sigmoid"  # or "ipo", "hinge"\nbeta = 0.1\nlabel_smoothing = 0.0\n'),
    "orpo": (("lora", "qlora"), 8e-6, 2e-5, "orpo_lambda = 0.1  # weight of the odds-ratio term beside the SFT loss\n"),
}

PREF_TEMPLATE = '''"""{title}
{note}
Preference pairs, one JSON object per line: {{"prompt": ..., "chosen": ..., "rejected": ...}} (texts or
message lists; sharegpt / alpaca variants work too, see docs/preference.md). Check them first:
`lmtune data check {name}_copy.py`. Copy and edit: `lmtune copy-cfg {name} ./config`.
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = {model!r}  # a local folder, a hub id or a .gguf file; usually your SFT model
datasets = [dict(path="data/my_pairs.jsonl", format="auto")]
prompt_template = 'auto'  # the tokenizer's own chat template
system = None
max_length = {max_length}  # per sequence (prompt + one answer); a packed row holds up to twice this
pack_to_max_length = True

evaluation_freq = 200
evaluation_inputs = ["Please introduce yourself.", "请你介绍一下你自己"]

#######################################################################
#                     PART 2  Model & Objective                       #
#######################################################################
method = {method!r}
quantization = {quantization!r}{quant_note}
{lora_block}objective = {objective!r}
{objective_block}{reference_block}torch_dtype = "auto"
gradient_checkpointing = "auto"  # on a GPU, only the layers the memory needs

#######################################################################
#                           PART 3  Data                              #
#######################################################################
num_proc = 4
shuffle_before_pack = True

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = {lr}
batch_size = 1  # per device, in packed rows of whole pairs
accumulative_counts = 16
max_epochs = 1
max_norm = 1.0
warmup_ratio = 0.1
weight_decay = 0.0

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
save_steps = 500
save_total_limit = 2
logging_steps = 10
seed = 42
'''



# Existing vision-language models (AutoModelForImageTextToText): LoRA / QLoRA on the language model
# over LLaVA-format data; the tower and projector frozen (LLaMA-Factory's defaults).
VLMS = {
    # name: (hub id, max_length, lr)
    "llava_1_5_7b_hf": ("llava-hf/llava-1.5-7b-hf", 2048, 2e-4),
    "llava_v1_6_mistral_7b_hf": ("llava-hf/llava-v1.6-mistral-7b-hf", 4096, 2e-4),
    "qwen2_vl_2b_instruct": ("Qwen/Qwen2-VL-2B-Instruct", 4096, 1e-4),
    "qwen2_5_vl_3b_instruct": ("Qwen/Qwen2.5-VL-3B-Instruct", 4096, 1e-4),
    "qwen2_5_vl_7b_instruct": ("Qwen/Qwen2.5-VL-7B-Instruct", 4096, 1e-4),
    "smolvlm_256m_instruct": ("HuggingFaceTB/SmolVLM-256M-Instruct", 4096, 2e-4),
    "idefics3_8b_llama3": ("HuggingFaceM4/Idefics3-8B-Llama3", 4096, 1e-4),
}
VLM_METHODS = ("lora", "qlora")
VLM_DATA = "llava"  # LLaVA json (sharegpt-shaped, "image" + "<image>" in the text)

VLM_TEMPLATE = '''"""{hub}: {meth} fine-tuning of its language model on LLaVA-format image conversations.

The tower and the projector stay frozen (set train_vision_tower / train_projector to train them).
The result is an adapter folder with the model's processor; `lmtune convert merge` makes a whole
model, and `lmtune chat work_dirs/{name} --image IMG` talks to it.
Copy and edit: `lmtune copy-cfg {name} ./config`, then set the data and image folder.
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = {hub!r}
# {{"image": "rel/path.jpg", "conversations": [{{"from": "human", "value": "<image>\\n..."}}, {{"from": "gpt", ...}}]}}
datasets = [dict(path="data/llava_conversations.json", format="sharegpt")]
image_folder = "data/images"  # relative image paths start here
prompt_template = "auto"  # the model's own chat template (it writes its image placeholders)
max_length = {max_length}  # counts the image tokens
pack_to_max_length = True

evaluation_freq = 0
evaluation_inputs = []

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
method = "lora"
quantization = {quantization!r}{quant_note}
lora_r = 64
lora_alpha = 16
lora_dropout = 0.05
lora_target_modules = "all-linear"  # of the language model
train_vision_tower = "frozen"  # or "lora" / "full"
train_projector = "frozen"  # or "lora" / "full"
torch_dtype = "auto"
gradient_checkpointing = "auto"  # on a GPU, only the layers the memory needs

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = {lr}
batch_size = 1  # packed rows per device
accumulative_counts = 16
max_epochs = 1
max_norm = 1.0
warmup_ratio = 0.03

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
save_steps = 500
save_total_limit = 2
logging_steps = 10
seed = 42
'''


def _entries() -> dict[str, tuple]:
    out = {f"{m}_{meth}_{d}": (m, meth, d) for m in MODELS for meth in METHODS for d in DATA}
    for m in MODELS:
        for objective, (methods, *_rest) in PREFERENCE.items():
            for meth in methods:
                out[f"{m}_{meth}_{objective}_pairs"] = (m, meth, objective)
    return out


def _vlm_entries() -> dict[str, tuple]:
    return {f"{m}_{meth}_{VLM_DATA}": (m, meth) for m in VLMS for meth in VLM_METHODS}


def preset_names() -> list[str]:
    return sorted({**_entries(), **_vlm_entries()})


def _render_vlm(name: str, entry: tuple) -> str:
    mname, meth = entry
    hub, max_len, lr = VLMS[mname]
    return VLM_TEMPLATE.format(
        name=name, hub=hub, meth=meth, max_length=max_len, lr=lr, quantization="nf4" if meth == "qlora" else "none",
        quant_note="  # QLoRA: 4-bit language model (tower and projector stay bf16)" if meth == "qlora" else "")


def _lora_block(method: str) -> str:
    return "" if method == "full" else (
        'lora_r = 64\nlora_alpha = 16\nlora_dropout = 0.1\nlora_target_modules = "all-linear"\n')


def _quant_note(meth: str) -> str:
    return "  # QLoRA: 4-bit NF4 base + LoRA (needs bitsandbytes)" if meth == "qlora" else ""


def render(name: str) -> str | None:
    """The config file text of preset `name`, or None if there is no such preset."""
    if name in _vlm_entries():
        return _render_vlm(name, _vlm_entries()[name])
    entry = _entries().get(name)
    if entry is None:
        return None
    mname, meth, kind = entry
    hub, max_len, lr_full, lr_lora = MODELS[mname]
    m = METHODS[meth]
    note = next((v for k, v in NOTES.items() if mname.startswith(k)), "")
    if kind in PREFERENCE:
        _, pref_lr_full, pref_lr_lora, block = PREFERENCE[kind]
        reference = ""
        if kind == "dpo":
            reference = ("precompute_reference = True  # reference log-probs computed once: no second model in memory\n"
                         if meth == "full" else
                         "precompute_reference = False  # the reference is this model with its adapter off\n")
        return PREF_TEMPLATE.format(
            title=f"{hub}: {kind.upper()} ({meth}) on preference pairs.", note=note, name=name, model=hub,
            max_length=max_len, method=m["method"], quantization=m["quantization"], quant_note=_quant_note(meth),
            lora_block=_lora_block(m["method"]), objective=kind, objective_block=block, reference_block=reference,
            lr=pref_lr_full if meth == "full" else pref_lr_lora)
    dpath, dformat, dnote, split = DATA[kind]
    entry = f"dict(path={dpath!r}, split={split!r}, format={dformat!r})" if split else \
        f"dict(path={dpath!r}, format={dformat!r})"
    return TEMPLATE.format(
        note=note, title=f"{hub}: {meth} fine-tuning on {kind} data.", name=name, model=hub,
        data_entry=entry, data_note=dnote,
        max_length=max_len, method=m["method"], quantization=m["quantization"], quant_note=_quant_note(meth),
        lora_block=_lora_block(m["method"]), gc=m["gc"], lr=lr_full if meth == "full" else lr_lora,
        batch_size=m["batch_size"], accumulative_counts=m["accumulative_counts"],
    )
