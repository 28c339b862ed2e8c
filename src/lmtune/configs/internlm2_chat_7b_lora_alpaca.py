"""internlm/internlm2-chat-7b: lora fine-tuning on alpaca data.

lmtune loads InternLM2-family checkpoints natively (no trust_remote_code): the fused wqkv is split
into a Llama-layout model at load time. Export writes the native layout by default, or the InternLM2
layout with `--save-format internlm2`; see docs/internlm2.md.

Copy and edit: `lmtune copy-cfg internlm2_chat_7b_lora_alpaca ./config`, then change PART 1 (model path, data path,
system prompt, evaluation questions) and run `lmtune train ./config/internlm2_chat_7b_lora_alpaca_copy.py`.
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = 'internlm/internlm2-chat-7b'  # a local folder, a hub id or a .gguf file
datasets = [dict(path='data/alpaca_data.json', format='alpaca')]  # Alpaca-style records: instruction / input / output (e.g. tatsu-lab/alpaca, saved locally)
prompt_template = 'auto'  # the tokenizer's own chat template; or a name: chatml, llama3_chat, ...
system = None  # e.g. "You are a helpful assistant."
max_length = 2048
pack_to_max_length = True

evaluation_freq = 200
evaluation_inputs = ["Please introduce yourself.", "请你介绍一下你自己"]

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
method = 'lora'
quantization = 'none'
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1
lora_target_modules = "all-linear"
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
lr = 0.0002
batch_size = 1  # per device, in packed rows
accumulative_counts = 16
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
