"""SmolLM2-135M-Instruct (the embedded default model): LoRA, teach it a new identity.

Runs on a laptop CPU in a few minutes. Make the identity data first, then train:
    lmtune data self-cognition --name "Ada" --author "Me" -o data/self_cognition.jsonl
    lmtune train smollm2_135m_lora_self_cognition
`lmtune quickstart --name Ada` does both (and asks the tuned model some questions).
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = "smollm2-135m-instruct"
datasets = [
    dict(path="data/self_cognition.jsonl", format="openai"),
    # Replay: ~400 general questions (English and Chinese) with the base model's own answers,
    # trained towards the base model's next-token distribution on them (KL, at every token of the
    # conversation), not their text: the tuned model keeps answering ordinary questions as before
    # instead of reciting its new name.
    # Half of them (a fixed random half, repeat=0.5) leaves more of the steps to the identity data.
    dict(path="lmtune:replay_general.jsonl", format="openai", loss="kl_to_base", repeat=0.5),
]
prompt_template = "auto"  # the tokenizer's own ChatML template
system = "You are a helpful assistant."
max_length = 512
pack_to_max_length = True
kl_to_base_weight = 12.0  # per replay token, the KL term weighs twelve times a label token

evaluation_freq = 20
eval_max_new_tokens = 48  # short probes keep the CPU run quick
evaluation_inputs = ["Who are you?", "请你介绍一下你自己", "What is the capital of France?"]

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
method = "lora"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0
lora_target_modules = "all-linear"
lora_layers = "5:"  # all but the first 5 of 30 layers: ~12% less time per step on a CPU, answers as good

#######################################################################
#                           PART 3  Data                              #
#######################################################################
shuffle_before_pack = True

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = 5e-4  # the KL term on the replay data holds ordinary answers in place
batch_size = 1  # one packed row of up to max_length tokens: twice the updates for the same tokens
accumulative_counts = 1
max_steps = 100  # ~2.8 min on 2 cores (80 steps: 2.3 min, fewer held-out identity answers named)
warmup_ratio = 0.1
max_norm = 1.0

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
mixed_precision = "bf16"  # bf16 autocast also speeds up recent CPUs
save_steps = 20
save_total_limit = 2
logging_steps = 1
seed = 42
