"""silotune: fine-tune one LLM across silos whose data and model stay private."""

__version__ = "0.1.0"
