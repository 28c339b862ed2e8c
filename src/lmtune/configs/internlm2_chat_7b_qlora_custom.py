"""InternLM2-Chat-7B (internlm/internlm2-chat-7b): QLoRA on your own conversations (OpenAI messages format).

lmtune loads InternLM2-family checkpoints natively (no trust_remote_code): the fused wqkv is split
into a Llama-layout model at load time. Export writes the native layout by default, or the InternLM2
layout with `--save-format internlm2`; see docs/internlm2.md.

Copy and edit: `lmtune copy-cfg internlm2_chat_7b_qlora_custom ./config`, then change PART 1 (model path, data path,
system prompt, evaluation questions) and run `lmtune train ./config/internlm2_chat_7b_qlora_custom_copy.py`.
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = 'internlm/internlm2-chat-7b'  # a hub id, or the local folder you downloaded it to
datasets = [dict(path='data/my_conversations.jsonl', format='openai')]  # one JSON object per line: {"messages": [{"role": "user", "content": ...}, ...]}
prompt_template = 'internlm2_chat'  # <|im_start|>role\n...<|im_end|>\n, stops at <|im_end|>
system = None  # e.g. "You are an AI assistant whose name is InternLM (书生·浦语)."
max_length = 2048
pack_to_max_length = True

evaluation_freq = 500
evaluation_inputs = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
method = 'lora'
quantization = 'nf4'  # QLoRA: 4-bit NF4 base + LoRA (needs bitsandbytes and a GPU)
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1
lora_target_modules = "all-linear"  # q/k/v/o and gate/up/down of the native (split) layout
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
lr = 2e-04
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
