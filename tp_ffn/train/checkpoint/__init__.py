"""Training checkpoints: DCP save/load, the restricted reader, digests, the parameter layout, export."""
