"""Save a randomly initialised model of a real shape, with a given tokenizer, for GPU runs.

    python tests/gpu/make_random_model.py --shape qwen2.5-1.5b --tokenizer DIR --out DIR
"""

import argparse

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, rope_theta=1e6),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=32768,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      dtype="bfloat16", **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B-parameter {args.shape} to {args.out}")


if __name__ == "__main__":
    main()
