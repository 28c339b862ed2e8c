"""LLaVA stage 1 (the tutorial's homework): Qwen2.5-7B-Instruct + SigLIP so400m-patch14-384, projector only.

The LLM and the vision tower stay frozen; only the 2-layer MLP projector learns to turn CLIP
features into the LLM's embeddings, from image-caption pairs (LLaVA-Pretrain's 558k). The result,
work_dirs/<this name>/hf, is a whole LlavaForConditionalGeneration folder; stage 2 starts from it:
    lmtune train llava_qwen2_5_7b_instruct_siglip_so400m_p14_384_pretrain
    lmtune train llava_qwen2_5_7b_instruct_siglip_so400m_p14_384_finetune
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = "Qwen/Qwen2.5-7B-Instruct"  # the LLM
vision_tower = "google/siglip-so400m-patch14-384"
# LLaVA json: {"image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\n..."}, ...]}
datasets = [dict(path="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", format="sharegpt")]
image_folder = "data/LLaVA-Pretrain/images"  # relative image paths start here
prompt_template = "auto"  # Qwen2.5's own template
max_length = 4096  # counts the 729 image tokens of each image
pack_to_max_length = True

evaluation_freq = 500
evaluation_inputs = []

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
vision_stage = "pretrain"  # only the projector trains
train_projector = "full"
vision_feature_layer = -2  # LLaVA-1.5: the tower's second-to-last layer
vision_select_strategy = "full"  # SigLIP has no CLS feature: 729 tokens per image
projector_hidden_act = "gelu"
method = "lora"  # (no LoRA is added in the pretrain stage)
quantization = "none"
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
lr = 1e-3
batch_size = 8  # packed rows per device (~3 captions each)
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
