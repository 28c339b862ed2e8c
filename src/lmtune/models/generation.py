"""Small generation helpers shared by training probes, export and serving."""

from __future__ import annotations


def stop_token_ids(tokenizer, stop_words: list[str]) -> list[int]:
    """EOS plus every stop word that is a single token in this vocabulary."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()  # membership, not convert_tokens_to_ids: a stop word may be the unk token
    for word in stop_words:
        tid = vocab.get(word)
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


def render_prompt(template, messages: list[dict], system: str | None) -> str:
    msgs = list(messages)
    if system and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}] + msgs
    return template.render(msgs, add_generation_prompt=True)


def greedy_reply(model, tokenizer, template, question: str, system: str | None, max_new_tokens: int = 128):
    """Greedy answer to one question, through the chat template. Returns (text, stopped)."""
    import torch

    prompt = render_prompt(template, [{"role": "user", "content": question}], system)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    device = next(p.device for p in model.parameters())
    enc = {k: v.to(device) for k, v in enc.items()}
    stops = stop_token_ids(tokenizer, template.stop_words)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        )
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stopped = bool(new) and new[-1] in stops
    text = tokenizer.decode(new, skip_special_tokens=True)
    for word in template.stop_words:
        text = text.split(word)[0]
    return text.strip(), stopped
