"""Qwen/Qwen2.5-7B-Instruct: DPO (lora) on preference pairs.

Preference pairs, one JSON object per line: {"prompt": ..., "chosen": ..., "rejected": ...} (texts or
message lists; sharegpt / alpaca variants work too, see docs/preference.md). Check them first:
`lmtune data check qwen2_5_7b_instruct_lora_dpo_pairs_copy.py`. Copy and edit: `lmtune copy-cfg qwen2_5_7b_instruct_lora_dpo_pairs ./config`.
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = 'Qwen/Qwen2.5-7B-Instruct'  # a local folder, a hub id or a .gguf file; usually your SFT model
datasets = [dict(path="data/my_pairs.jsonl", format="auto")]
prompt_template = 'chatml'
system = None
max_length = 2048  # per sequence (prompt + one answer); a packed row holds up to twice this
pack_to_max_length = True

evaluation_freq = 200
evaluation_inputs = ["Please introduce yourself.", "请你介绍一下你自己"]

#######################################################################
#                     PART 2  Model & Objective                       #
#######################################################################
method = 'lora'
quantization = 'none'
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1
lora_target_modules = "all-linear"
objective = 'dpo'
dpo_loss = "sigmoid"  # or "ipo", "hinge"
beta = 0.1
label_smoothing = 0.0
precompute_reference = False  # the reference is this model with its adapter off
torch_dtype = "auto"
gradient_checkpointing = True

#######################################################################
#                           PART 3  Data                              #
#######################################################################
num_proc = 4
shuffle_before_pack = True

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = 5e-06
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
