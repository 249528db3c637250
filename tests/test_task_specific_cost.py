"""What a result keeps per task beyond one merged encoder and the heads, counted and reported."""

from __future__ import annotations

import torch
from torch import nn

from symerge.report.markdown import inference_cost_table
from symerge.result import MergeResult


def tiny_result(**extra) -> MergeResult:
    encoder = nn.Linear(4, 3)  # 15 floating-point values
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return MergeResult("m", ["a", "b"], encoder, state, {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}, **extra)


def test_overrides_and_adapters_are_counted_heads_and_integer_buffers_are_not():
    overrides = {"a": {"weight": torch.zeros(3, 4), "steps": torch.zeros(5, dtype=torch.long)}}
    result = tiny_result(task_overrides=overrides, adapters={"b": nn.Linear(3, 3)})
    assert result.task_specific_values() == 12 + 12
    assert result.encoder_values() == 15


def test_a_plain_merge_keeps_nothing_per_task():
    assert tiny_result().task_specific_values() == 0


def test_cost_table_lists_task_specific_rows_and_wemoe():
    report = {"methods": {
        "task_arithmetic": {},
        "symerge": {"task_specific": {"values": 300, "per_task": 150, "of_encoder": 0.004356}},
        "wemoe": {"inference_cost": {"extra_stored_params": 900, "extra_params_ratio": 1.5, "router_params": 40,
                                     "slowdown": 1.25}},
    }}
    table = inference_cost_table(report)
    assert "| symerge | 300 | 150 | 0.00436× | - | - |" in table  # small adapters stay visible
    assert "| wemoe | 900 | - | 1.50× | 40 | 1.25× |" in table
    assert "task_arithmetic" not in table
