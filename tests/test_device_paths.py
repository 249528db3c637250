"""Every adaptive and evaluation path on a second device, without a GPU (see logical_device.py).

A test here fails wherever an op mixes CPU and accelerator tensors, as it would on CUDA, and checks that the
values equal the plain CPU run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from logical_device import ACCELERATOR, DeviceMixError, OnAccelerator, logical_accelerator
from symerge.adaptive import TrainerConfig, adapt, build_trainer
from symerge.adaptive.finish import finish
from symerge.evaluation.cross_task import cross_task_matrices
from symerge.merging import merge_task_vectors
from symerge.result import MergeResult

FAST = dict(steps=3, batch_size=16, progress=False, lr=1e-2, layer_lr=1e-2)

CASES = {
    "symerge-hard": ("symerge", {}),
    "symerge-soft": ("symerge", {"labels": "soft"}),
    "symerge-l1": ("symerge", {"task_kinds": {"task2": "regression"}}),
    "symerge-block": ("symerge", {"task_layer": "block:layer2."}),
    "adamerging": ("adamerging", {}),
    "surgery": ("surgery", {"rank": 4}),
    "wemoe": ("wemoe", {}),
}


def test_the_harness_catches_a_mix_and_allows_what_cuda_allows():
    with logical_accelerator() as device:
        x = torch.ones(4, 3).to(device)
        assert isinstance(x, OnAccelerator) and x.device == ACCELERATOR
        with pytest.raises(DeviceMixError, match="same device"):
            x + torch.ones(4, 3)
        assert float((x * torch.tensor(2.0)).sum()) == 24.0  # 0-dim CPU scalars mix, as on CUDA
        assert x[torch.tensor([0, 2])].shape == (2, 3)  # CPU indices, as on CUDA
        assert type(x.cpu()) is torch.Tensor
        lin = torch.nn.Linear(3, 2).to(device)
        lin(x).sum().backward()
        assert isinstance(lin.weight.grad, OnAccelerator)
        with pytest.raises(DeviceMixError):
            lin(torch.ones(4, 3))


@pytest.mark.parametrize("case", list(CASES))
def test_adaptive_method_on_a_second_device_equals_cpu(toy_problem, case):
    method, options = CASES[case]
    tv = toy_problem.task_vectors()
    inputs = {t: x[:48] for t, x in toy_problem.adapt_inputs.items()}
    cpu = adapt(method, toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**FAST), **options)
    with logical_accelerator() as device:
        result = adapt(method, toy_problem.encoder, toy_problem.heads, tv, inputs,
                       config=TrainerConfig(**FAST, device=device), **options)
        x = toy_problem.test_inputs["task0"][:20]
        on_device = result.predict("task0", x, device=device)
    if cpu.lambdas is not None:  # WEMoE learns routers, not λ: its encoder_state holds them
        assert type(result.lambdas) is torch.Tensor and result.lambdas.device.type == "cpu"
        torch.testing.assert_close(result.lambdas, cpu.lambdas, atol=1e-5, rtol=1e-5)
    assert all(type(v) is torch.Tensor for v in result.encoder_state.values()), "result state must come back to CPU"
    torch.testing.assert_close(result.encoder_state, cpu.encoder_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on_device, cpu.predict("task0", x), atol=1e-4, rtol=1e-4)
    assert [round(h["loss"], 4) for h in result.loss_history] == [round(h["loss"], 4) for h in cpu.loss_history]


def test_checkpoint_and_resume_on_a_second_device(toy_problem, tmp_path):
    tv = toy_problem.task_vectors()
    inputs = {t: x[:48] for t, x in toy_problem.adapt_inputs.items()}
    ckpt = tmp_path / "ckpt.pt"
    cfg = dict(FAST, steps=4, checkpoint_every=2, checkpoint_path=ckpt)
    with logical_accelerator() as device:
        first = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs,
                              config=TrainerConfig(**cfg, device=device))
        first.run(stop_after=3)
        second = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs,
                               config=TrainerConfig(**cfg, device=device, resume=True))
        second.run()
        resumed = finish(second)
    full = adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**dict(FAST, steps=4)))
    torch.testing.assert_close(resumed.lambdas, full.lambdas, atol=1e-6, rtol=1e-6)


def test_evaluation_paths_on_a_second_device(toy_problem):
    tv = toy_problem.task_vectors()
    ta = MergeResult("task_arithmetic", tv.tasks, toy_problem.encoder, merge_task_vectors("task_arithmetic", tv),
                     dict(toy_problem.heads))
    base = toy_problem.encoder.state_dict()
    encoders = {t: {**base, **toy_problem.experts[t]} for t in tv.tasks}
    inputs = {t: x[:32] for t, x in toy_problem.test_inputs.items()}
    labels = {t: y[:32] for t, y in toy_problem.test_labels.items()}
    expected = cross_task_matrices(toy_problem.encoder, encoders, {"original": toy_problem.heads}, inputs, labels,
                                   progress=False)
    with logical_accelerator() as device:
        logits = {t: ta.predict(t, inputs[t], device=device) for t in tv.tasks}
        swapped = ta.with_heads(toy_problem.heads).predict("task1", inputs["task1"], device=device)
        matrices = cross_task_matrices(toy_problem.encoder, encoders, {"original": toy_problem.heads}, inputs, labels,
                                       device=device, progress=False)
    assert all(type(v) is torch.Tensor for v in logits.values()), "predictions come back on the CPU"
    for t in tv.tasks:
        torch.testing.assert_close(logits[t], ta.predict(t, inputs[t]))
    torch.testing.assert_close(swapped, ta.predict("task1", inputs["task1"]))
    assert matrices == expected


@pytest.mark.parametrize("method,options", [("symerge", {}), ("adamerging", {}), ("surgery", {"rank": 4})])
def test_bf16_autocast_on_cpu_stays_close_to_fp32(toy_problem, method, options):
    """bf16 autocast (merged forward + expert pass) keeps λ within 0.01 of fp32 (measured 0.002) after 6 steps at lr 1e-2, and the
    merged model predicts the same classes on ≥ 95 % of test inputs; λ and heads stay fp32."""
    tv = toy_problem.task_vectors()
    runs = {p: adapt(method, toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                     config=TrainerConfig(**dict(FAST, steps=6), precision=p), **options) for p in ("fp32", "bf16")}
    low, full = runs["bf16"], runs["fp32"]
    assert low.lambdas.dtype == torch.float32 and all(h.weight.dtype == torch.float32 for h in low.heads.values())
    assert float((low.lambdas - full.lambdas).abs().max()) <= 0.01
    x = toy_problem.test_inputs["task1"]
    agree = (low.predict("task1", x).argmax(1) == full.predict("task1", x).argmax(1)).float().mean()
    assert float(agree) >= 0.95
    assert low.provenance["config"]["precision"] == "bf16" and full.provenance["config"]["precision"] == "fp32"
    if method == "symerge":  # the experts' pass ran in bf16 too, so some cached logits differ from fp32
        assert not torch.equal(low.heads["task0"].weight, full.heads["task0"].weight)


def test_fp16_is_refused_on_cpu_with_a_clear_message(toy_problem):
    from symerge.errors import ValidationError

    with pytest.raises(ValueError, match="fp16' needs a GPU"):
        TrainerConfig(device="cpu", precision="fp16")
    tv = toy_problem.task_vectors()
    with pytest.raises(ValidationError, match="fp16' needs a GPU"):
        build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                      config={"precision": "fp16", **FAST})


def test_loss_scaler_path_unscales_before_the_update(toy_problem):
    """The fp16 GradScaler path (GPU only in real use) exercised on the CPU: same λ as the unscaled run."""
    tv = toy_problem.task_vectors()
    inputs = {t: x[:48] for t, x in toy_problem.adapt_inputs.items()}
    plain = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**FAST))
    scaled = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**FAST))
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plain.run()
    scaled.run()
    torch.testing.assert_close(finish(scaled).lambdas, finish(plain).lambdas, atol=1e-6, rtol=1e-5)
    assert scaled.scaler.get_scale() == 1024.0  # no overflow, so the scale never dropped


def test_bench_with_an_unavailable_device_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    import time

    import symerge.data.fetch as fetch
    from symerge.cli import main

    def no_download(*args, **kwargs):
        raise AssertionError("a download started before the device was checked")

    for name in dir(fetch):
        if name.startswith(("fetch", "download", "ensure")) and callable(getattr(fetch, name)):
            monkeypatch.setattr(fetch, name, no_download)
    for device in ("cuda", "cuda:1", "mps", "tpu", "meta"):
        start = time.perf_counter()
        code = main(["bench", "text", "--quick", "--device", device, "--out", str(tmp_path / "run"), "--no-progress"])
        assert code == 2 and time.perf_counter() - start < 10
        assert not (tmp_path / "run").exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("symerge: error: --device:"), err


def test_text_suite_on_a_second_device_equals_cpu(tmp_path, monkeypatch):
    """Expert fine-tuning, the shared expert pass, static + adaptive methods, curves and diagnostics on the device."""
    from test_text_suite import synthetic_task, tiny_bert_dir

    from symerge.suites.runner import AdaptSettings
    from symerge.suites.text import TextSuiteConfig, run_text_suite

    model_dir = tiny_bert_dir(tmp_path / "tiny-bert")
    tasks = [synthetic_task("alpha", 3, 1, n=80), synthetic_task("beta", 2, 2, n=80)]
    reports = {}
    for name in ("device", "cpu"):
        monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / f"cache-{name}"))
        with logical_accelerator() if name == "device" else contextlib.nullcontext("cpu") as device:
            cfg = TextSuiteConfig(
                max_test=24, max_adapt=24, max_train=40, n_val=8, max_len=10, device=device,
                expert={"steps": 4, "batch_size": 8, "lr": 1e-3, "head_lr": 1e-2}, freeze_word_embeddings=False,
                adapt=AdaptSettings(steps=2, batch_size=8, curve=[1, 2]), cross_task_samples=8,
                methods=["individual", "task_arithmetic_val", "adamerging", "surgery", "symerge", "wemoe"],
            )
            reports[name] = run_text_suite(cfg, tmp_path / name, model_dir=model_dir, tasks=tasks, progress=False,
                                           log=lambda _: None)
    for method in ("individual", "task_arithmetic_val", "adamerging", "surgery", "symerge", "wemoe"):
        got, want = reports["device"]["methods"][method], reports["cpu"]["methods"][method]
        assert got["per_task"] == pytest.approx(want["per_task"], abs=1e-6), method
    for heads in ("original", "symerge"):
        assert reports["device"]["cross_task"][heads] == reports["cpu"]["cross_task"][heads]
    assert reports["device"]["config"]["device"] == "meta"


def test_merge_command_and_load_predict_on_a_second_device(tmp_path):
    import hf_tiny

    import symerge
    from symerge.pipeline import run_merge

    labels = {"alpha": 2, "beta": 3}
    pre, experts = hf_tiny.make_pool(tmp_path, "bert", labels)
    adapt_files, eval_files = hf_tiny.write_data(tmp_path, labels)
    config = {
        "model": {"family": "hf_text", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()}},
        "method": {"name": "symerge", "trainer": {"steps": 2, "batch_size": 4}},
        "data": {"adapt": adapt_files, "eval": eval_files, "max_len": hf_tiny.MAX_LEN},
    }
    with logical_accelerator() as device:
        result, out = run_merge({**config, "device": device, "output_dir": str(tmp_path / "dev")}, progress=False)
        loaded = symerge.load(out)
        batch = {"input_ids": torch.randint(5, 40, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
        on_device = loaded.predict("beta", batch, device=device)
    reference, _ = run_merge({**config, "output_dir": str(tmp_path / "cpu")}, progress=False)
    assert type(on_device) is torch.Tensor
    torch.testing.assert_close(on_device, reference.predict("beta", batch), atol=1e-5, rtol=1e-5)


def run_on_both(tmp_path, monkeypatch, run: Callable[[str, Path], dict]) -> dict[str, dict]:
    """The same suite run on the logical accelerator and on the CPU (fresh expert caches each)."""
    reports = {}
    for name in ("device", "cpu"):
        monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / f"cache-{name}"))
        with logical_accelerator() if name == "device" else contextlib.nullcontext("cpu") as device:
            reports[name] = run(device, tmp_path / name)
    assert reports["device"]["config"]["device"] == "meta"
    return reports


def test_vision_suite_with_batchnorm_reestimation_on_a_second_device(tmp_path, monkeypatch):
    from test_vision_suite import synthetic_image_task, tiny_config, tiny_pretrained_cnn

    from symerge.suites.vision import run_vision_suite

    tasks = [synthetic_image_task("alpha", 3, 1, n=60), synthetic_image_task("beta", 2, 2, n=60)]
    methods = ["individual", "task_arithmetic", "adamerging", "surgery", "symerge"]

    def run(device: str, out: Path) -> dict:
        cfg = tiny_config(device=device, methods=methods, bn_reestimate=True)
        return run_vision_suite(cfg, out, encoder=tiny_pretrained_cnn(), tasks=tasks, progress=False, log=lambda _: None)

    reports = run_on_both(tmp_path, monkeypatch, run)
    for method in methods:
        assert reports["device"]["methods"][method]["per_task"] == pytest.approx(
            reports["cpu"]["methods"][method]["per_task"], abs=1e-6), method


def test_dense_suite_on_a_second_device(tmp_path, monkeypatch):
    """Per-pixel soft labels (segmentation) and L1 (depth, normals) with decoders as the task layer."""
    from test_dense_suite import TinyDenseEncoder, synthetic_sources

    from symerge.suites.dense import DenseSuiteConfig, run_dense_suite
    from symerge.suites.runner import AdaptSettings

    methods = ["individual", "task_arithmetic", "adamerging", "surgery", "symerge"]

    def run(device: str, out: Path) -> dict:
        torch.manual_seed(0)
        cfg = DenseSuiteConfig(n_train=16, n_adapt=8, n_val=4, n_test=8, figure_scenes=1, device=device, methods=methods,
                               expert={"steps": 3, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2},
                               adapt=AdaptSettings(regime="dense", steps=2, batch_size=4, lr=1e-2, layer_lr=1e-3,
                                                   curve=[1, 2]))
        return run_dense_suite(cfg, out, encoder=TinyDenseEncoder().eval(), sources=synthetic_sources(), progress=False,
                               log=lambda _: None)

    reports = run_on_both(tmp_path, monkeypatch, run)
    for method in methods:
        for task, metrics in reports["cpu"]["methods"][method]["per_task"].items():
            assert reports["device"]["methods"][method]["per_task"][task] == pytest.approx(metrics, rel=1e-4, abs=1e-5)
