"""Model loading (local HF directories, the bundled SmolLM2), tiny test models, and attention wiring."""
