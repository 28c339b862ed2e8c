"""meta-llama/Llama-3.2-3B-Instruct: full fine-tuning on alpaca data.

Copy and edit: `lmtune copy-cfg llama3_2_3b_instruct_full_alpaca ./config`, then change PART 1 (model path, data path,
system prompt, evaluation questions) and run `lmtune train ./config/llama3_2_3b_instruct_full_alpaca_copy.py`.
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = 'meta-llama/Llama-3.2-3B-Instruct'  # a local folder, a hub id or a .gguf file
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
method = 'full'
quantization = 'none'
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
lr = 1e-05
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
