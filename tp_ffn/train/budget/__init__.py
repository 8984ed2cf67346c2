"""Memory and FLOP budgeting: :mod:`.memory` (the per-rank plan and its refusal), :mod:`.memory_use`
(what is measured) and :mod:`.flops` (model FLOPs per token, MFU)."""
