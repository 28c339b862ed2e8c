"""Write the built-in model × method × data configs in src/lmtune/configs/.

Each is a plain, self-explaining file users copy with `lmtune copy-cfg` and edit; this script
only saves typing them by hand. Re-run it after changing the table below.
"""

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/lmtune/configs"

MODELS = {
    # name: (hub id, template, max_length, lr full, lr lora)
    "qwen2_5_1_5b_instruct": ("Qwen/Qwen2.5-1.5B-Instruct", "chatml", 2048, 1e-5, 2e-4),
    "qwen2_5_7b_instruct": ("Qwen/Qwen2.5-7B-Instruct", "chatml", 2048, 1e-5, 2e-4),
    "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3_chat", 2048, 1e-5, 2e-4),
    "llama3_2_3b_instruct": ("meta-llama/Llama-3.2-3B-Instruct", "llama3_chat", 2048, 1e-5, 2e-4),
    "internlm2_chat_1_8b": ("internlm/internlm2-chat-1_8b", "internlm2_chat", 2048, 1e-5, 2e-4),
    "internlm2_chat_7b": ("internlm/internlm2-chat-7b", "internlm2_chat", 2048, 1e-5, 2e-4),
    "internlm2_5_chat_7b": ("internlm/internlm2_5-7b-chat", "internlm2_chat", 2048, 1e-5, 2e-4),
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
    "custom": ("data/my_conversations.jsonl", "openai",
               "your own conversations, one JSON object per line: {\"messages\": [...]}"),
    "alpaca": ("data/alpaca_data.json", "alpaca",
               "Alpaca-style records: instruction / input / output (e.g. tatsu-lab/alpaca, saved locally)"),
    "oasst1": ("data/oasst1.jsonl", "oasst1",
               "guanaco-style '### Human: ... ### Assistant: ...' text (e.g. timdettmers/openassistant-guanaco)"),
}
METHODS = {
    "full": dict(method="full", quantization="none", batch_size=1, accumulative_counts=16, gc=True),
    "lora": dict(method="lora", quantization="none", batch_size=1, accumulative_counts=16, gc=True),
    "qlora": dict(method="lora", quantization="nf4", batch_size=1, accumulative_counts=16, gc=True),
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
datasets = [dict(path={data_path!r}, format={data_format!r})]  # {data_note}
prompt_template = {template!r}
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
gradient_checkpointing = {gc}

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
prompt_template = {template!r}
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
gradient_checkpointing = True

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


def preference_configs() -> int:
    n = 0
    for mname, (hub, template, max_len, _, _) in MODELS.items():
        for objective, (methods, lr_full, lr_lora, block) in PREFERENCE.items():
            for meth in methods:
                m = METHODS[meth]
                name = f"{mname}_{meth}_{objective}_pairs"
                lora_block = "" if m["method"] == "full" else (
                    'lora_r = 64\nlora_alpha = 16\nlora_dropout = 0.1\nlora_target_modules = "all-linear"\n')
                if objective == "dpo":
                    reference = ("precompute_reference = True  # reference log-probs computed once: no second model "
                                 "in memory\n" if meth == "full" else
                                 "precompute_reference = False  # the reference is this model with its adapter off\n")
                else:
                    reference = ""
                note = next((v for k, v in NOTES.items() if mname.startswith(k)), "")
                text = PREF_TEMPLATE.format(
                    title=f"{hub}: {objective.upper()} ({meth}) on preference pairs.", note=note, name=name,
                    model=hub, template=template, max_length=max_len, method=m["method"],
                    quantization=m["quantization"],
                    quant_note="  # QLoRA: 4-bit NF4 base + LoRA (needs bitsandbytes)" if meth == "qlora" else "",
                    lora_block=lora_block, objective=objective, objective_block=block, reference_block=reference,
                    lr=lr_full if meth == "full" else lr_lora)
                (OUT / f"{name}.py").write_text(text, encoding="utf-8")
                n += 1
    return n


def main():
    n = preference_configs()
    for mname, (hub, template, max_len, lr_full, lr_lora) in MODELS.items():
        for meth, m in METHODS.items():
            for dname, (dpath, dformat, dnote) in DATA.items():
                name = f"{mname}_{meth}_{dname}"
                lora_block = "" if m["method"] == "full" else (
                    'lora_r = 64\nlora_alpha = 16\nlora_dropout = 0.1\nlora_target_modules = "all-linear"\n')
                note = next((v for k, v in NOTES.items() if mname.startswith(k)), "")
                text = TEMPLATE.format(
                    note=note, title=f"{hub}: {meth} fine-tuning on {dname} data.", name=name, model=hub,
                    data_path=dpath, data_format=dformat, data_note=dnote, template=template,
                    max_length=max_len, method=m["method"], quantization=m["quantization"],
                    quant_note="  # QLoRA: 4-bit NF4 base + LoRA (needs bitsandbytes)" if meth == "qlora" else "",
                    lora_block=lora_block, gc=m["gc"], lr=lr_full if meth == "full" else lr_lora,
                    batch_size=m["batch_size"], accumulative_counts=m["accumulative_counts"],
                )
                (OUT / f"{name}.py").write_text(text, encoding="utf-8")
                n += 1
    print(f"wrote {n} configs")


if __name__ == "__main__":
    main()
