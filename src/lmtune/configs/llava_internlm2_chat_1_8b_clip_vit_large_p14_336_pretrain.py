"""LLaVA stage 1 (the tutorial's homework): InternLM2-chat-1.8B + CLIP ViT-L/14-336, projector only.

The LLM and the vision tower stay frozen; only the 2-layer MLP projector learns to turn CLIP
features into the LLM's embeddings, from image-caption pairs (LLaVA-Pretrain's 558k). The result,
work_dirs/<this name>/hf, is a whole LlavaForConditionalGeneration folder; stage 2 starts from it:
    lmtune train llava_internlm2_chat_1_8b_clip_vit_large_p14_336_pretrain
    lmtune train llava_internlm2_chat_1_8b_clip_vit_large_p14_336_finetune
"""

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
model = "internlm/internlm2-chat-1_8b"  # the LLM (loaded natively, no remote code)
vision_tower = "openai/clip-vit-large-patch14-336"
# LLaVA json: {"image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\n..."}, ...]}
datasets = [dict(path="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", format="sharegpt")]
image_folder = "data/LLaVA-Pretrain/images"  # relative image paths start here
prompt_template = "auto"  # InternLM2-chat's own template (what `internlm2_chat` names)
max_length = 2048  # counts the 576 image tokens of each image
pack_to_max_length = True

evaluation_freq = 500
evaluation_inputs = []

#######################################################################
#                     PART 2  Model & Tokenizer                       #
#######################################################################
vision_stage = "pretrain"  # only the projector trains
train_projector = "full"
vision_feature_layer = -2  # LLaVA-1.5: the tower's second-to-last layer
vision_select_strategy = "default"  # drop CLIP's CLS feature: 576 tokens per image
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
