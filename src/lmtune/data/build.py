"""The rows the Trainer reads, for the config's objective: token rows (SFT, pretraining) from
dataset.py, or preference pairs / labelled answers from preference.py."""

from __future__ import annotations


def build_training_data(cfg, tokenizer, template, use_cache: bool = True):
    from lmtune.data import preference

    if preference.is_preference(cfg.objective):
        return preference.build_preference_dataset(cfg, tokenizer, template, use_cache)
    from lmtune.data.dataset import build_dataset

    return build_dataset(cfg, tokenizer, template, use_cache)
