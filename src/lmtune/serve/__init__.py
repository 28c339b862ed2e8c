"""Talking to a model: chat CLI, web page, OpenAI-compatible API."""
