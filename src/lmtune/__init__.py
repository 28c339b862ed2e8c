"""lmtune: turn a base language model and your conversations into your own assistant."""

__version__ = "0.1.0"
