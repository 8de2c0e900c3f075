"""pocketembed.gguf_models: the model catalog and the offline preparation of GGUF files."""
