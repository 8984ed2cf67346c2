"""Tokenizers: one class per format, and which one a path or a checkpoint names."""
