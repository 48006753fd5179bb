"""Model loading (local folders, presets, GGUF) and slicing into head, trunk and tail."""
