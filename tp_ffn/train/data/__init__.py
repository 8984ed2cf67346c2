"""What the model is trained on: :mod:`.documents` (what --data names), :mod:`.corpus` (bytes or
tokens, the split, the training stream), :mod:`.token_cache` (the memory-mapped token file) and
:mod:`.tokenizers`."""
