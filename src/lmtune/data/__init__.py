"""Data: every format becomes one Conversation type; templates; tokenize, mask, pack."""
