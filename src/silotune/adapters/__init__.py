"""Adapters (LoRA, P-tuning v2 prefix) attached through PEFT and saved in PEFT format."""
