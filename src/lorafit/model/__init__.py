"""The model stage: local-only loading of the base and tokenizer, bitsandbytes quantization, LoRA attach, the
embedded tiny model, and resolving an adapter folder to its base (``adapters``).
May use: errors, hashing, run_folder, config, data."""
