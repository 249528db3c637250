"""The dense suite: scene geometry against brute-force references, metrics against numpy / scikit-learn, the
hypercolumn encoder and decoders, and the whole pipeline on a tiny random CNN and synthetic sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from symerge.data import scenes as sc
from symerge.evaluation.dense import (angular_errors, dense_score, depth_metrics, gap_closed, normal_metrics,
                                      segmentation_metrics)
from symerge.models.dense import DenseDecoder, MobileNetV2Hypercolumn, decoder_for
from symerge.suites.dense import DenseSuiteConfig, run_dense_suite
from symerge.suites.runner import AdaptSettings


# --- synthetic sources -----------------------------------------------------------------------------------------
def shape_image(kind: int, size: int = 28) -> np.ndarray:
    """A bright disc (even kinds) or square (odd kinds) on black, as uint8 RGB."""
    yy, xx = np.mgrid[:size, :size]
    centre = size / 2
    mask = ((yy - centre) ** 2 + (xx - centre) ** 2 < (size / 3) ** 2) if kind % 2 == 0 else (
        (abs(yy - centre) < size / 3) & (abs(xx - centre) < size / 3))
    return np.repeat((mask * 220 + 10).astype(np.uint8)[..., None], 3, axis=-1)


def synthetic_sources(n_objects: int = 12, classes: tuple[int, ...] = (1, 2, 3, 4)) -> sc.SceneSources:
    rng = np.random.default_rng(0)
    objects = [(shape_image(i), classes[i % len(classes)]) for i in range(n_objects)]
    textures = rng.integers(40, 200, size=(4, 16, 16, 3)).astype(np.uint8)
    return sc.build_sources(objects, textures)


# --- geometry ------------------------------------------------------------------------------------------------------
def test_dome_gradients_match_finite_differences():
    x, y = np.meshgrid(np.linspace(0.2, 0.8, 13), np.linspace(0.25, 0.75, 11))
    args = dict(centre=(0.5, 0.5), radius=0.4, base=3.0, tilt=(0.7, -0.4), bulge=0.3)
    z, zx, zy = sc.dome_surface(x, y, **args)
    eps = 1e-6
    fx = (sc.dome_surface(x + eps, y, **args)[0] - sc.dome_surface(x - eps, y, **args)[0]) / (2 * eps)
    fy = (sc.dome_surface(x, y + eps, **args)[0] - sc.dome_surface(x, y - eps, **args)[0]) / (2 * eps)
    inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 < (0.9 * 0.4) ** 2
    np.testing.assert_allclose(zx[inside], fx[inside], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zy[inside], fy[inside], rtol=1e-5, atol=1e-6)
    assert z[inside].max() < 3.0 + 0.7 * 0.3 + 0.4 * 0.25  # the bulge moves the surface towards the camera


def test_unit_normals_are_perpendicular_to_the_surface_tangents():
    a, b = np.array([0.3, -2.0]), np.array([1.5, 0.1])
    n = sc.unit_normals(a, b)
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, rtol=1e-12)
    for i in range(2):  # tangents of z = a x + b y: (1, 0, a) and (0, 1, b)
        assert abs(n[i] @ np.array([1.0, 0.0, a[i]])) < 1e-12
        assert abs(n[i] @ np.array([0.0, 1.0, b[i]])) < 1e-12
        assert n[i][2] > 0  # towards the camera


def test_scenes_are_deterministic_exact_and_split_by_instance(tmp_path):
    # even-numbered objects are discs of classes 1 and 3; odd ones squares of classes 2 and 4
    sources = synthetic_sources()
    train = sc.generate_scenes(sources, 6, seed=3, split="train")
    again = sc.generate_scenes(sources, 6, seed=3, split="train")
    test = sc.generate_scenes(sources, 6, seed=3, split="test")
    for field in ("images", "segmentation", "depth", "normals"):
        assert np.array_equal(getattr(train, field), getattr(again, field))
    assert not np.array_equal(train.images, test.images)
    assert set(np.unique(train.segmentation)) <= {0, 1, 3} and set(np.unique(test.segmentation)) <= {0, 2, 4}
    assert len(np.unique(train.segmentation)) > 1 and len(np.unique(test.segmentation)) > 1
    assert train.images.dtype == np.uint8 and train.images.shape == (6, sc.SIZE, sc.SIZE, 3)
    np.testing.assert_allclose(np.linalg.norm(train.normals, axis=-1), 1.0, rtol=1e-5)
    assert (train.depth > 1.0).all() and (train.depth < 10.0).all()
    # background pixels lie on one plane per scene: depth is affine in (x, y) there, its normal constant
    x, y = sc.pixel_grid()
    for i in range(len(train)):
        bg = train.segmentation[i] == 0
        design = np.stack([np.ones(bg.sum()), x[bg], y[bg]], axis=1)
        coef, *_ = np.linalg.lstsq(design, train.depth[i][bg], rcond=None)
        np.testing.assert_allclose(design @ coef, train.depth[i][bg], atol=1e-4)
        np.testing.assert_allclose(train.normals[i][bg], sc.unit_normals(np.full(1, coef[1]), np.full(1, coef[2]))
                                   .repeat(bg.sum(), 0), atol=1e-5)
        # objects are nearer than the background plane would be at their pixels
        fg = ~bg
        assert (train.depth[i][fg] < np.stack([np.ones(fg.sum()), x[fg], y[fg]], 1) @ coef).all()
    cached = sc.cached_scenes(tmp_path, sources, 6, 3, "train")
    assert np.array_equal(cached.depth, train.depth) and len(list(tmp_path.glob("train-*.npz"))) == 1
    assert np.array_equal(sc.cached_scenes(tmp_path, sources, 6, 3, "train").normals, train.normals)


def test_silhouette_mask_handles_both_polarities():
    bright = shape_image(0)[..., 0].astype(np.float32) / 255
    assert np.array_equal(sc.silhouette_mask(bright), sc.silhouette_mask(1.0 - bright))
    assert 0.2 < sc.silhouette_mask(bright).mean() < 0.5


# --- metrics -----------------------------------------------------------------------------------------------------------
def test_segmentation_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, jaccard_score

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 8, 8, generator=gen)
    labels = torch.randint(0, 4, (3, 8, 8), generator=gen)
    got = segmentation_metrics(logits, labels)
    pred = logits.argmax(1).reshape(-1).numpy()
    true = labels.reshape(-1).numpy()
    assert got["miou"] == pytest.approx(jaccard_score(true, pred, average="macro"), abs=1e-6)
    assert got["pixel_acc"] == pytest.approx(accuracy_score(true, pred), abs=1e-6)


def test_depth_and_normal_metrics_match_numpy():
    gen = torch.Generator().manual_seed(1)
    target = 2 + 5 * torch.rand(2, 1, 6, 6, generator=gen)
    pred = target + 0.3 * torch.randn(2, 1, 6, 6, generator=gen)
    got = depth_metrics(pred, target)
    t, p = target.numpy(), pred.numpy()
    assert got["abs_err"] == pytest.approx(np.abs(p - t).mean(), rel=1e-5)
    assert got["rel_err"] == pytest.approx((np.abs(p - t) / t).mean(), rel=1e-5)
    n_true = torch.nn.functional.normalize(torch.randn(2, 3, 5, 5, generator=gen), dim=1)
    n_pred = n_true + 0.2 * torch.randn(2, 3, 5, 5, generator=gen)
    a, b = n_pred.numpy(), n_true.numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    degrees = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    np.testing.assert_allclose(angular_errors(n_pred, n_true).numpy(), degrees, atol=1e-3)
    got = normal_metrics(n_pred, n_true)
    assert got["mean_angle"] == pytest.approx(degrees.mean(), abs=1e-3)
    assert got["within_11.25"] == pytest.approx((degrees < 11.25).mean(), abs=1e-6)
    assert normal_metrics(n_true, n_true)["mean_angle"] < 0.1


def test_dense_primary_scores_and_gap_closed():
    target = torch.full((1, 1, 4, 4), 4.0)
    assert dense_score("depth", target + 0.5, target).primary == pytest.approx(2.0)  # 1 / abs. error
    seg = dense_score("segmentation", torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4)))
    assert seg.primary == seg.metrics["miou"] and seg.ece is not None
    assert gap_closed(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert gap_closed(3.0, 5.0, 1.0) == pytest.approx(0.5)  # an error halfway from 5 down to 1
    assert np.isnan(gap_closed(1.0, 2.0, 2.0))


# --- models ---------------------------------------------------------------------------------------------------------
def test_hypercolumn_encoder_and_decoders_shapes():
    encoder = MobileNetV2Hypercolumn().eval()
    assert all(k.split(".")[1].isdigit() and int(k.split(".")[1]) <= 13 for k in encoder.state_dict())
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, MobileNetV2Hypercolumn.feature_dim, 16, 16)
    seg, depth, normals = (decoder_for(k, 5, seed=0)(features) for k in ("segmentation", "depth", "normals"))
    assert seg.shape == (2, 5, 64, 64) and depth.shape == (2, 1, 64, 64) and normals.shape == (2, 3, 64, 64)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 64, 64))
    with pytest.raises(ValueError, match="decoder kind"):
        DenseDecoder(4, 1, "optical_flow")


# --- the pipeline on a tiny CNN -----------------------------------------------------------------------------------------
class TinyDenseEncoder(nn.Module):
    """Two stride-2 conv + BN + ReLU blocks: [B, 3, 64, 64] -> [B, 12, 16, 16] (the hypercolumn's stride)."""

    feature_dim = 12

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU()),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_dense_suite_pipeline_on_tiny_cnn(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    encoder = TinyDenseEncoder().eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = DenseSuiteConfig(n_train=48, n_adapt=16, n_val=8, n_test=16, figure_scenes=2,
                           expert={"steps": 8, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2},
                           adapt=AdaptSettings(regime="dense", steps=4, batch_size=8, lr=1e-2, layer_lr=1e-3,
                                               curve=[2, 4]))
    out = tmp_path / "run"
    run_dense_suite(cfg, out, encoder=encoder, sources=synthetic_sources(), progress=False, log=lambda _: None)
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "dense" and [t["name"] for t in report["tasks"]] == ["segmentation", "depth", "normals"]
    assert report["tasks"][0]["num_classes"] == len(sc.SEG_CLASSES)
    assert {t["n_test"] for t in report["tasks"]} == {16}
    for name in cfg.methods:
        entry = report["methods"][name]
        assert set(entry["per_task"]["segmentation"]) == {"miou", "pixel_acc"}
        assert set(entry["per_task"]["depth"]) == {"abs_err", "rel_err"}
        assert set(entry["per_task"]["normals"]) == {"mean_angle", "median_angle", "within_11.25"}
        primary = entry["primary"]
        assert primary["segmentation"] == entry["per_task"]["segmentation"]["miou"]
        assert primary["depth"] == pytest.approx(1 / entry["per_task"]["depth"]["abs_err"])
        assert entry["normalized_average"] == pytest.approx(np.mean([
            primary[t] / report["methods"]["individual"]["primary"][t] for t in primary]))
    assert report["methods"]["individual"]["normalized_average"] == pytest.approx(1.0)
    assert [p["iterations"] for p in report["methods"]["symerge"]["curve"]] == [2, 4]
    gap = report["gap_closed"]
    assert gap["baseline"] == "task_arithmetic" and "symerge" in gap["methods"]
    assert set(gap["methods"]["symerge"]["depth"]) == {"abs_err", "rel_err"}
    for name in ("normalized.png", "gap_closed.png", "predictions.png", "lambda_symerge.png", "loss.png"):
        assert (out / name).stat().st_size > 1000, name
    assert not (out / "accuracy.png").exists()
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# symerge bench dense") and "segmentation miou" in markdown
    assert "## Gap closed" in markdown and "predictions.png" in markdown
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    # scenes and experts are cached: the second run fine-tunes nothing
    messages: list[str] = []
    run_dense_suite(cfg.model_copy(update={"methods": ["individual", "task_arithmetic"]}), tmp_path / "run2",
                    encoder=encoder, sources=synthetic_sources(), progress=False, log=messages.append)
    assert sum("cached" in m for m in messages) == 3


@pytest.mark.slow
def test_dense_suite_quick_on_real_mobilenet(tmp_path):
    report = run_dense_suite(DenseSuiteConfig.quick_preset(), tmp_path / "quick", progress=False)
    methods = report["methods"]
    assert methods["individual"]["per_task"]["segmentation"]["pixel_acc"] > 0.5
    assert methods["symerge"]["normalized_average"] > methods["task_arithmetic"]["normalized_average"]
    assert (tmp_path / "quick" / "predictions.png").exists()
