"""Memory and FLOP budgeting: the per-rank memory plan, measured memory, model FLOPs and MFU."""
