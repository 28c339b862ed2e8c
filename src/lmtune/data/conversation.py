"""The one Conversation type every data format converts into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    # Whether this message's tokens carry loss. None = the default: assistant yes, others no.
    loss: Optional[bool] = None

    def trains(self) -> bool:
        return self.role == "assistant" if self.loss is None else bool(self.loss)


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)
    # Plain text for continued pretraining (objective "pretrain"); then `messages` is empty
    # and every token carries loss.
    text: Optional[str] = None
    # Where the record came from, "file:line", for error messages and `data check`.
    source: str = ""
    # Image references (paths or data: URLs), one per `<image>` placeholder in the messages' text,
    # in order. Only references: pixels are read when a batch is built (see data/images.py).
    images: list[str] = field(default_factory=list)

    @property
    def is_pretrain(self) -> bool:
        return self.text is not None
