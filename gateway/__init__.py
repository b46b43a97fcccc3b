"""Secure LLM Gateway: an OpenAI-compatible reverse proxy with a plugin pipeline."""

__version__ = "0.1.0"
