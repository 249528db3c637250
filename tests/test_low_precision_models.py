"""bf16 / fp16 checkpoints (`model.dtype`): merged, adapted in fp32, evaluated and saved in the model's dtype."""

from __future__ import annotations

import pytest
import torch

import hf_tiny
from symerge.pipeline import run_merge

TRAINER = {"steps": 2, "batch_size": 4, "progress": False}


@pytest.mark.parametrize("method", [{"name": "ties"}, {"name": "symerge", "trainer": TRAINER},
                                    {"name": "surgery", "trainer": TRAINER}])
def test_bfloat16_pool_merges_adapts_and_evaluates(bert, tmp_path, method):
    """A bf16 model's features (fp32) used to reach its bf16 heads: "mat1 and mat2 must have the same dtype"."""
    cfg = hf_tiny.merge_config(bert, tmp_path / "out", method)
    cfg["model"]["dtype"] = "bfloat16"
    cfg["data"]["eval"] = dict(bert["eval"])
    result, _ = run_merge(cfg, progress=False)
    floats = [v for v in result.encoder_state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.bfloat16 for v in floats)  # saved in the model's dtype
    head_dtype = torch.float32 if "trainer" in method else torch.bfloat16  # adaptive methods keep heads in fp32
    assert all(p.dtype == head_dtype for p in result.heads["alpha"].parameters())
    batch = {"input_ids": torch.randint(5, 40, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    logits = result.predict("beta", batch)
    assert logits.dtype == torch.float32 and logits.shape == (3, 3) and bool(torch.isfinite(logits).all())
