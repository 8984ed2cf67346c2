"""What the model is trained on: documents, the corpus and its token cache, the tokenizers."""
