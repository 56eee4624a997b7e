"""The model stage: local-only loading of the base and tokenizer, bitsandbytes quantization, LoRA attach, the
embedded tiny model, and resolving an adapter folder to its base (``adapters``).
May use: errors, hashing, run_folder, config, data."""

# Weight files that are pickles (loading one can run code): refused for bases (model.loading) and adapters
# (artifact.verify) unless the user allows them. One list, so the two never disagree.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
