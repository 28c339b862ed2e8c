"""LLaVA stage 2 (the tutorial's homework): QLoRA on Qwen2.5-7B-Instruct, LoRA on SigLIP so400m-patch14-384,
the projector from stage 1 trained whole, on LLaVA-format conversations (llava_v1_5_mix665k).

Run the pretrain stage first (its work dir is `projector` below). The result, work_dirs/<this
name>/hf, is one merged LlavaForConditionalGeneration folder with its processor (QLoRA merged onto
the full-precision LLM), usable with plain transformers or:
    lmtune chat work_dirs/llava_qwen2_5_7b_instruct_siglip_so400m_p14_384_finetune --image cat.jpg
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = "Qwen/Qwen2.5-7B-Instruct"
vision_tower = "google/siglip-so400m-patch14-384"
projector = "./work_dirs/llava_qwen2_5_7b_instruct_siglip_so400m_p14_384_pretrain"  # stage 1's output
datasets = [dict(path="data/llava_data/LLaVA-Instruct-150K/llava_v1_5_mix665k.json", format="sharegpt")]
image_folder = "data/llava_data/llava_images"
prompt_template = "auto"  # Qwen2.5's own template
max_length = 4096  # counts the 729 image tokens of each image
pack_to_max_length = True

evaluation_freq = 500
evaluation_inputs = []

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
vision_stage = "finetune"
method = "lora"
quantization = "nf4"  # QLoRA: 4-bit LLM; tower and projector stay bf16
lora_r = 128  # on the LLM
lora_alpha = 256
lora_dropout = 0.05
lora_target_modules = "all-linear"
train_vision_tower = "lora"
vision_lora_r = 64
vision_lora_alpha = 16
train_projector = "full"
vision_feature_layer = -2
vision_select_strategy = "full"
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
lr = 2e-4
batch_size = 4  # packed rows per device
accumulative_counts = 4
max_epochs = 1
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
