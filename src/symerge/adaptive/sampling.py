"""Seeded sampling, kept importable from here; it lives in `symerge.sampling` (generic: the trainer and the suites'
expert fine-tuning both sample through it)."""

from symerge.sampling import GROUP, TaskSampler, derived_seed, make_samplers, task_order, token_lengths

__all__ = ["GROUP", "TaskSampler", "derived_seed", "make_samplers", "task_order", "token_lengths"]
