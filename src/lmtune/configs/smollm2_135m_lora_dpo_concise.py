"""SmolLM2-135M-Instruct (the embedded default model): LoRA DPO, teach it to stop instead of rambling.

The pairs come from the model's own answers (scripts/concise_demo.py): chosen = the first sentence
or two of its answer, rejected = the answer as it came, running on. Runs on a laptop CPU in a few
minutes; see docs/preference.md ("Recipe"):
    lmtune train smollm2_135m_lora_dpo_concise --work-dir work_dirs/concise
    python scripts/concise_demo.py evaluate work_dirs/concise
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = "smollm2-135m-instruct"
datasets = [dict(path="lmtune:concise_pairs.jsonl", format="openai")]
prompt_template = "auto"  # the tokenizer's own ChatML template
system = "You are a helpful assistant."
max_length = 192  # per sequence: prompt + one answer
pack_to_max_length = True

evaluation_freq = 0
eval_max_new_tokens = 64
evaluation_inputs = ["Describe the ocean.", "What is the capital of France?"]

#######################################################################
#                     PART 2  Model & Objective                       #
#######################################################################
method = "lora"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0
lora_target_modules = "all-linear"
objective = "dpo"
dpo_loss = "sigmoid"
beta = 0.1
precompute_reference = True  # one pass over the pairs before training; then no reference forward

#######################################################################
#                           PART 3  Data                              #
#######################################################################
shuffle_before_pack = True

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = 2e-4  # a few times higher and DPO overshoots: answers shrink to nothing (see docs/preference.md)
batch_size = 2  # packed rows of whole pairs
accumulative_counts = 1
max_steps = 12
warmup_ratio = 0.1
max_norm = 1.0

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
mixed_precision = "bf16"  # bf16 autocast also speeds up recent CPUs
save_steps = 12
save_total_limit = 1
logging_steps = 1
seed = 42
