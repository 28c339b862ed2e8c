"""lmtune: turn a base language model and your conversations into your own assistant."""

__version__ = "0.1.0"

# Before anything can import bitsandbytes (directly, or through peft/transformers): hide its one
# CPU-kernel warning users cannot act on (see lmtune/models/quant.py).
from lmtune.models.quant import hide_bitsandbytes_noise as _hide_bitsandbytes_noise  # noqa: E402

_hide_bitsandbytes_noise()
