"""Export: a checkpoint or trained model -> a folder other tools use.

    hf.py    Hugging Face folders (final `hf/`, `convert pth_to_hf`, `convert merge`)
    app.py   `lmtune export app`: a self-contained chat app folder
"""

from lmtune.export.hf import check_hf_out, merge, pth_to_hf, save_tokenizer, save_trained_model

__all__ = ["check_hf_out", "merge", "pth_to_hf", "save_tokenizer", "save_trained_model"]
