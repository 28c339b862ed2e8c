#!/usr/bin/env bash
# The user's workflow on one GPU with the same commands and built-in configs as on a CPU:
# data -> train (LoRA, then QLoRA) -> resume -> chat (bf16 and --bits 4) -> merge -> serve (HTTP).
# Model: a randomly initialised Qwen2.5-1.5B-shaped model (answers are noise; this checks that
# every step runs on the GPU). Run through the device tool:
#   bash tests/gpu/e2e_workflow.sh   (carry .gpucarry; writes $OUT/e2e.log)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpucarry/whl/bitsandbytes-*.whl \
    .gpucarry/serve/*.whl .gpucarry/whl/pydantic*.whl .gpucarry/whl/typing_inspection*.whl .gpucarry/whl/annotated_types*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 LMTUNE_CACHE_DIR=/tmp/lmtune_cache
L() { python3 -m lmtune.cli "$@"; }
T0=$(date +%s); step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

step "random Qwen2.5-1.5B-shaped model"
python3 tests/gpu/make_random_model.py --tokenizer .gpucarry/tok --out /tmp/model
step "data"
L data self-cognition --name Ada --author Me --n 200 -o /tmp/data/self_cognition.jsonl
COMMON=(model=/tmp/model "datasets=['/tmp/data/self_cognition.jsonl']" prompt_template=auto max_length=1024
        save_steps=5 logging_steps=5 evaluation_freq=5 "evaluation_inputs=['Who are you?']" eval_max_new_tokens=8)
step "train LoRA (built-in qwen2_5_1_5b_instruct_lora_custom), 8 steps"
L train qwen2_5_1_5b_instruct_lora_custom --work-dir /tmp/w_lora --cfg-options "${COMMON[@]}" max_steps=8 accumulative_counts=2
step "resume from the newest checkpoint and continue to 10 steps"
L train qwen2_5_1_5b_instruct_lora_custom --work-dir /tmp/w_lora --resume auto --cfg-options "${COMMON[@]}" max_steps=10 accumulative_counts=2
python3 - <<'PY'
import json
log = [json.loads(l) for l in open("/tmp/w_lora/logs/train_log.jsonl") if '"loss"' in l]
print("logged steps:", [r["step"] for r in log], "tokens/s at end:", log[-1]["tokens_per_s"])
PY
step "train QLoRA (built-in qwen2_5_1_5b_instruct_qlora_custom), 6 steps"
L train qwen2_5_1_5b_instruct_qlora_custom --work-dir /tmp/w_qlora --cfg-options "${COMMON[@]}" max_steps=6 accumulative_counts=2
step "chat (bf16) and chat --bits 4"
L chat /tmp/w_lora/hf --prompt "Who are you?" --max-new-tokens 12
L chat /tmp/w_lora/hf --prompt "Who are you?" --max-new-tokens 12 --bits 4
step "convert pth_to_hf and merge"
L convert pth_to_hf /tmp/w_lora/iter_10 /tmp/converted
L convert merge /tmp/model /tmp/w_lora/hf /tmp/merged --max-shard-size 1GB
ls -la /tmp/merged
step "serve the merged model and call it over HTTP"
L serve /tmp/merged --port 8123 --model-name ada > /tmp/serve.log 2>&1 &
SERVER=$!
python3 - <<'PY'
import time, httpx
for _ in range(240):
    try:
        if httpx.get("http://127.0.0.1:8123/health", timeout=2).status_code == 200:
            break
    except Exception:
        time.sleep(1)
r = httpx.post("http://127.0.0.1:8123/v1/chat/completions", timeout=120,
               json={"model": "ada", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 12})
print(r.status_code, r.json()["choices"][0]["finish_reason"], r.json()["usage"])
with httpx.stream("POST", "http://127.0.0.1:8123/v1/chat/completions", timeout=120,
                  json={"model": "ada", "stream": True, "max_tokens": 8,
                        "messages": [{"role": "user", "content": "Hello"}]}) as s:
    chunks = [l for l in s.iter_lines() if l.startswith("data: ")]
print("stream chunks:", len(chunks), "last:", chunks[-1])
PY
kill $SERVER
nvidia-smi --query-gpu=name,memory.used --format=csv
step "all steps ran"
