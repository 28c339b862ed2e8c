"""SmolLM2-135M-Instruct (the embedded default model): full fine-tuning, teach it a new identity.

Runs on a laptop CPU in a few minutes. Make the identity data first, then train:
    lmtune data self-cognition --name "Ada" --author "Me" -o data/self_cognition.jsonl
    lmtune train smollm2_135m_full_self_cognition
`lmtune quickstart --name Ada` does both (and asks the tuned model some questions).
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = "smollm2-135m-instruct"
datasets = [
    dict(path="data/self_cognition.jsonl", format="openai"),
    # Replay: ~400 general questions (English and Chinese) with the base model's own answers,
    # trained towards the base model's next-token distribution on them (KL), not their text: the
    # tuned model keeps answering ordinary questions as before instead of reciting its new name.
    dict(path="lmtune:replay_general.jsonl", format="openai", loss="kl_to_base"),
]
prompt_template = "auto"  # the tokenizer's own ChatML template
system = "You are a helpful assistant."
max_length = 512
pack_to_max_length = True

evaluation_freq = 10
eval_max_new_tokens = 48  # short probes keep the CPU run quick
evaluation_inputs = ["Who are you?", "请你介绍一下你自己", "What is the capital of France?"]

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
method = "full"

#######################################################################
#                           PART 3  Data                              #
#######################################################################
shuffle_before_pack = True

#######################################################################
#                  PART 4  Optimizer & Schedule                       #
#######################################################################
lr = 2e-5
batch_size = 2  # packed rows of up to max_length tokens
accumulative_counts = 1
max_steps = 30
warmup_ratio = 0.1
max_norm = 1.0

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
mixed_precision = "bf16"  # bf16 autocast also speeds up recent CPUs
save_steps = 10
save_total_limit = 2
logging_steps = 1
seed = 42
