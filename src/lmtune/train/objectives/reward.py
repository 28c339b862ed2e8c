"""Reward model: a scalar score per answer, trained on pairs with the Bradley–Terry loss

    loss = −log σ(s(x, y_w) − s(x, y_l))

The model is the language model's backbone with a one-output head (model kind "reward",
AutoModelForSequenceClassification with num_labels = 1), exported as a sequence-classification
folder. A packed sequence's score is the head's output at the position a transformers sequence
classifier reads: the sequence's last token that is not the padding token. So the exported model,
given prompt + answer, returns the score trained here. Logged: the scores of chosen and rejected
answers, their margin and accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.errors import UserError
from lmtune.train.objectives.base import Forward
from lmtune.train.objectives.preference import PreferenceObjective, pair_metrics


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen_scores - rejected_scores)


def pool_index(input_ids: list[int], seq_lens: list[int], pad_id) -> list[int]:
    """Per sequence, the index (in the flat row) of its last token that is not `pad_id`."""
    out, start = [], 0
    for n in seq_lens:
        j = start + n - 1
        while pad_id is not None and j > start and input_ids[j] == pad_id:
            j -= 1
        out.append(j)
        start += n
    return out


class Reward(PreferenceObjective):
    name = "reward"
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")

    def __init__(self, cfg, reference_model=None):
        super().__init__(cfg, reference_model)
        self.pad_id = None
        self._scores = None

    def setup(self, trainer) -> None:
        from lmtune.models.kinds import base_model

        model = base_model(trainer.model)
        if not hasattr(model, "score"):
            raise UserError("objective 'reward' needs a model with a score head (model kind 'reward')")
        if model.config.pad_token_id is None:  # what the exported classifier pools by
            model.config.pad_token_id = trainer.tokenizer.pad_token_id
        self.pad_id = model.config.pad_token_id
        # The head scores every position; keep its output to read each sequence's last token.
        model.score.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self._scores = output

    def make_batch(self, rows: list[dict]) -> dict:
        b = super().make_batch(rows)
        ids, lens = b["input_ids"][0].tolist(), [n for r in rows for n in r["seq_lens"]]
        b["pool_index"] = torch.tensor(pool_index(ids, lens, self.pad_id), dtype=torch.long)
        return b

    def loss(self, model, batch: dict, forward: Forward):
        self._scores = None
        forward(model, batch)
        scores, self._scores = self._scores, None
        s = scores[0, batch["pool_index"], 0].float()
        c, r = s[batch["chosen_seq"]], s[batch["rejected_seq"]]
        return reward_loss(c, r).sum(), pair_metrics(c, r)
