"""bf16 storage of τ during adaptation, the memory model and `symerge plan` (no weights loaded)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_tiny
from symerge import memory_plan as mp
from symerge.adaptive import MergedEncoder
from symerge.cli import main as cli_main
from symerge.config import load_config
from symerge.errors import ValidationError
from symerge.taskvectors import TaskVectors


def tiny_pool(num_tasks: int = 3, seed: int = 0) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 5))
    base = encoder.state_dict()
    experts = {f"t{k}": {n: v + 0.05 * torch.randn_like(v) for n, v in base.items()} for k in range(num_tasks)}
    return encoder, experts


def lambda_grad(encoder: nn.Module, tv: TaskVectors, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    merged = MergedEncoder(encoder, tv, init=0.3)
    params = merged.params()
    loss = torch.func.functional_call(merged.encoder, params, (x,)).square().mean()
    loss.backward()
    return merged.lambdas.grad.clone(), params


def test_bf16_tau_gives_fp32_theta_and_close_lambda_gradients():
    encoder, experts = tiny_pool()
    base = encoder.state_dict()
    x = torch.randn(32, 6)
    fp32 = TaskVectors.from_state_dicts(base, experts)
    bf16 = TaskVectors.from_state_dicts(base, experts, dtype="bfloat16")
    grad32, params32 = lambda_grad(encoder, fp32, x)
    grad16, params16 = lambda_grad(encoder, bf16, x)
    assert all(p.dtype == torch.float32 for p in params16.values())  # θ is built in fp32, never in bf16
    assert torch.allclose(grad16, grad32, rtol=2e-2, atol=1e-4)  # only τ's rounding differs (bf16: 8 mantissa bits)
    # exactly θ_pre + Σ λ τ with τ upcast: the bf16 path adds no error of its own
    for key, value in params16.items():
        expected = base[key] + 0.3 * bf16.vectors[key].float().sum(0)
        assert torch.allclose(value, expected, atol=1e-6)
    tau_bytes = {name: sum(v.numel() * v.element_size() for v in tv.vectors.values()) for name, tv in
                 (("fp32", fp32), ("bf16", bf16))}
    assert tau_bytes["bf16"] * 2 == tau_bytes["fp32"]


def test_bf16_tau_is_not_upcast_whole_for_backward():
    """Autograd keeps the stored (bf16) τ for λ's gradient, not an fp32 copy: memory stays halved during a step."""
    encoder, experts = tiny_pool(num_tasks=4)
    tv = TaskVectors.from_state_dicts(encoder.state_dict(), experts, dtype="bfloat16")
    merged = MergedEncoder(encoder, tv)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        merged.params()
    stacked = [t for t in saved if t.dim() == 2 and t.shape[0] == 4 and t.shape[1] > 4]  # [K, entries]: τ, not λ
    assert stacked and all(t.dtype == torch.bfloat16 for t in stacked)


def test_activation_constant_matches_saved_tensors_of_a_bert_forward():
    """The per-layer constant of the memory model is what autograd saves on this torch / transformers."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=256), add_pooling_layer=False).eval()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    weights = {p.untyped_storage().data_ptr() for p in params.values()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch, tokens = 8, 24
    inputs = {"input_ids": torch.randint(5, 100, (batch, tokens)), "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.func.functional_call(model, params, (), inputs)
    estimate = mp.activation_bytes(batch, tokens, 64, 2)
    assert estimate == pytest.approx(sum(seen.values()), rel=0.15)


def test_plan_memory_parts():
    shape = mp.ModelShape(encoder_params=1000, merged_params=800, largest_tensor=200, hidden=8, layers=2, tokens=4,
                          feature_dim=8, tensors=10)
    run = mp.RunShape(tasks=["a", "b"], samples={"a": 10, "b": 20}, outputs={"a": 2, "b": 3},
                      head_params={"a": 18, "b": 27}, batch_size=4, lambda_rows=10)
    plan = mp.plan_memory(shape, run)
    assert plan.resident["τ (2 × 0.0008 M × float32)"] == 2 * 800 * 4
    assert plan.resident["cached expert outputs and features"] == (10 * 10 + 20 * 11) * 4
    assert plan.resident["task layers (value, gradient, Adam)"] == 45 * 16
    assert plan.peak == max(plan.step_peak, plan.export_peak) > mp.RUNTIME_BYTES
    half = mp.plan_memory(shape, mp.RunShape(**{**run.__dict__, "storage_dtype": "bfloat16"}))
    assert half.resident["τ (2 × 0.0008 M × bfloat16)"] * 2 == plan.resident["τ (2 × 0.0008 M × float32)"]
    with pytest.raises(ValidationError, match="storage dtype 'int8'"):
        mp.tau_bytes(2, 10, "int8")


def test_safetensors_header_read_without_tensors(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    assert mp.header_shapes(tmp_path / "m.safetensors") == {"w": ((3, 4), "F32"), "b": ((4,), "BF16")}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(ValidationError, match="bad.safetensors"):
        mp.header_shapes(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="holds no .safetensors"):
        mp.header_shapes(tmp_path / "empty")
    with pytest.raises(ValidationError, match="missing.safetensors' does not exist"):
        mp.header_shapes(tmp_path / "missing.safetensors")


def hf_config(tmp_path: Path, storage: str = "float32", name: str = "symerge",
              options: dict | None = None) -> Path:
    labels = {"sst2": 2, "topic": 3}
    tmp_path.mkdir(parents=True, exist_ok=True)
    pre, experts = hf_tiny.make_pool(tmp_path, labels=labels)
    adapt, _ = hf_tiny.write_data(tmp_path, labels, n=12)
    return hf_tiny.write_config(
        tmp_path / f"config-{storage}.yaml",
        model={"family": "hf_text", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()}},
        method={"name": name, "storage_dtype": storage, "trainer": {"steps": 2, "batch_size": 4},
                **({"options": options} if options else {})},
        data={"adapt": adapt, "max_len": 12}, output_dir=str(tmp_path / f"out-{storage}"))


def test_plan_config_hf_text_counts_shapes_from_config_json(tmp_path: Path):
    from transformers import AutoModel

    path = hf_config(tmp_path)
    plan, shape, run = mp.plan_config(load_config(path))
    base = AutoModel.from_pretrained(load_config(path).model.pretrained)
    floating = sum(v.numel() for v in base.state_dict().values() if v.is_floating_point())
    assert shape.encoder_params == floating  # meta-device count equals the real model's
    assert run.samples == {"sst2": 12, "topic": 12}
    assert run.outputs == {"sst2": 2, "topic": 3}
    tau = next(v for k, v in plan.resident.items() if k.startswith("τ"))
    assert tau == 2 * floating * 4
    bf16_plan, _, _ = mp.plan_config(load_config(hf_config(tmp_path / "b", "bfloat16")))
    assert next(v for k, v in bf16_plan.resident.items() if k.startswith("τ")) == tau // 2


def test_plan_counts_trained_heads_only_where_heads_train(tmp_path: Path):
    """Heads get gradient and Adam state only when SyMerge trains them; λ-only SyMerge, AdaMerging and Surgery keep
    them frozen."""
    def trained_head_params(name: str, options: dict | None = None) -> int:
        cfg = load_config(hf_config(tmp_path / f"{name}-{bool(options)}", name=name, options=options))
        return sum(mp.plan_config(cfg)[2].head_params.values())

    assert trained_head_params("symerge") > 0
    for name, options in (("symerge", {"train_layer": False}), ("adamerging", None), ("surgery", None)):
        assert trained_head_params(name, options) == 0, name


def test_cli_plan_prints_estimate_and_names_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = hf_config(tmp_path)
    assert cli_main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "estimated peak" in out and "τ (2 ×" in out
    assert not (tmp_path / "out-float32").exists()  # nothing written
    text = path.read_text().replace("storage_dtype: float32", "storage_dtype: int8")
    path.write_text(text)
    assert cli_main(["plan", str(path)]) == 2
    assert "method.storage_dtype" in capsys.readouterr().err


def test_plan_config_clip(tmp_path: Path):
    pre, experts = hf_tiny.make_clip(tmp_path, ["a", "b"])
    adapt = {}
    for task in experts:
        hf_tiny.write_images(tmp_path / f"img-{task}", 3, seed=0)
        adapt[task] = str(tmp_path / f"img-{task}")
    path = hf_tiny.write_config(
        tmp_path / "clip.yaml",
        model={"family": "clip", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()},
               "class_names": {"a": ["x", "y"], "b": ["u", "v", "w"]}},
        method={"name": "adamerging", "storage_dtype": "bfloat16", "trainer": {"steps": 1}},
        data={"adapt": adapt}, output_dir=str(tmp_path / "out"))
    plan, shape, run = mp.plan_config(load_config(path))
    assert run.samples == {"a": 3, "b": 3} and run.outputs == {"a": 2, "b": 3}
    assert shape.tokens > 1 and shape.activation_per_layer in mp.ACTIVATION_PER_LAYER.values()
    assert plan.peak > mp.RUNTIME_BYTES


def test_vit_table_shapes():
    b32 = mp.vit_shape(768, 12, 32, 224, 87_800_000, 512)
    assert b32.tokens == 50
    run = mp.RunShape(tasks=[f"t{i}" for i in range(20)], samples={}, outputs={}, head_params={},
                      storage_dtype="bfloat16", experts_held=False)
    assert mp.tau_bytes(20, b32.merged_params, "bfloat16") == 20 * 87_800_000 * 2
    assert mp.plan_memory(b32, run).peak < mp.plan_memory(b32, mp.RunShape(**{**run.__dict__, "storage_dtype": "float32"})).peak


def test_merge_config_bf16_storage_end_to_end(tmp_path: Path):
    """`method.storage_dtype: bfloat16` reaches the adaptation: same λ as fp32 up to τ's rounding, fp32 output."""
    from symerge.pipeline import run_merge

    results = {s: run_merge(hf_config(tmp_path / s, s), progress=False)[0] for s in ("float32", "bfloat16")}
    lam32, lam16 = results["float32"].lambdas, results["bfloat16"].lambdas
    assert lam16 is not None and lam32 is not None and torch.allclose(lam16, lam32, atol=2e-3)
    assert all(v.dtype == torch.float32 for v in results["bfloat16"].encoder_state.values() if v.is_floating_point())


def test_plan_static_streaming_method_does_not_count_stacked_tau(tmp_path: Path):
    path = hf_config(tmp_path)
    text = path.read_text()
    import yaml

    data = yaml.safe_load(text)
    data["method"] = {"name": "task_arithmetic"}
    data.pop("data")
    path.write_text(yaml.safe_dump(data))
    plan, shape, run = mp.plan_config(load_config(path))
    assert not run.adaptive and not run.tau_materialised
    assert not any(k.startswith("τ (") for k in plan.resident)
