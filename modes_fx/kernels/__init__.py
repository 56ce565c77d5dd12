"""Implementations of the masked experts computation: `reference` (the oracle) and `fast` (what `modes::masked_experts` runs)."""
