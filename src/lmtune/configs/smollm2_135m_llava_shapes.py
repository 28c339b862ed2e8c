"""SmolLM2-135M-Instruct + a small vision tower, composed as a LLaVA and taught coloured shapes.

`lmtune quickstart --vision` makes the random tower and the pictures, then trains with this config
(vision_tower and datasets pointed at what it made). The tower (it starts random) and the projector
train whole; the LLM stays frozen: it already answers questions, it only has to be shown the
picture (and a frozen LLM is cheapest to back-propagate through on a CPU).
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = "smollm2-135m-instruct"
vision_tower = "work_dirs/quickstart_vision/tower"  # written by `lmtune quickstart --vision`
datasets = ["work_dirs/quickstart_vision/data/train/shapes.jsonl"]
prompt_template = "auto"  # SmolLM2's own ChatML template
system = "Answer with one word."  # short (SmolLM2's default system prompt would triple each sample)
max_length = 256
pack_to_max_length = True

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
method = "lora"
vision_stage = "finetune"
train_llm = False
train_vision_tower = "full"  # random at the start: it has to learn to see
train_projector = "full"
vision_feature_layer = -1

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = 2e-3
batch_size = 3  # packed rows of up to max_length tokens (about 10 questions each)
accumulative_counts = 1
max_steps = 60
warmup_ratio = 0.05
max_norm = 1.0

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
mixed_precision = "bf16"
save_steps = 1000
save_total_limit = 1
logging_steps = 5
seed = 42
