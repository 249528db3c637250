"""Family `hf_image`: Hugging Face image classifiers (tiny random ViT / ResNet / ConvNeXt, saved with save_pretrained
with an image processor) merged by `symerge merge`, exported, and reloaded with symerge and with plain transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hf_tiny
import symerge
from symerge.errors import ValidationError
from symerge.export import task_model
from symerge.models.families.hf_image import ARCHITECTURES, split_classifier
from symerge.pipeline import run_merge

LABELS = {"pets": ["cat", "dog"], "cars": ["sedan", "truck", "van"]}
TRAINER = {"steps": 2, "batch_size": 4, "progress": False}


def classifier(arch: str, num_labels: int):
    import transformers

    common = dict(num_labels=num_labels, id2label={i: str(i) for i in range(num_labels)})
    if arch == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8,
            **common))
    if arch == "resnet":
        return transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **common))
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **common))


def processor(size: int):
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(size={"height": size, "width": size}, do_resize=True)


def make_image_pool(root, arch: str, size: int):
    """A pretrained base-model dir (with its image processor) and expert classifiers fine-tuned from it (perturbed
    base weights, own random heads and labels)."""
    torch.manual_seed(0)
    pre = classifier(arch, 2).eval()
    pre_dir = hf_tiny.save(pre.base_model, root / f"{arch}-pre", with_tokenizer=False)
    processor(size).save_pretrained(pre_dir)
    experts = {}
    for i, (task, names) in enumerate(LABELS.items()):
        expert = classifier(arch, len(names)).eval()
        expert.config.id2label = dict(enumerate(names))
        expert.config.label2id = {n: j for j, n in enumerate(names)}
        gen = torch.Generator().manual_seed(i + 1)
        expert.base_model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                                           else v for k, v in pre.base_model.state_dict().items()})
        experts[task] = hf_tiny.save(expert, root / f"{arch}-{task}", with_tokenizer=False)
    return pre_dir, experts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    adapt = {t: str(hf_tiny.write_images(root / "adapt" / t, 6, i)) for i, t in enumerate(LABELS)}
    evals = {}
    for i, (task, names) in enumerate(LABELS.items()):
        for j, name in enumerate(names):
            hf_tiny.write_images(root / "eval" / task / name, 2, 100 + 10 * i + j)
        evals[task] = str(root / "eval" / task)
    return {"adapt": adapt, "eval": evals}


@pytest.fixture(scope="module", params=[("vit", 16), ("resnet", 32)], ids=["vit", "resnet"])
def pool(request, tmp_path_factory):
    arch, size = request.param
    pre, experts = make_image_pool(tmp_path_factory.mktemp(arch), arch, size)
    return {"arch": arch, "size": size, "pre": pre, "experts": experts}


def config(pool, data, out, method, **extra):
    return {"model": {"family": "hf_image", "pretrained": str(pool["pre"]),
                      "experts": {t: str(p) for t, p in pool["experts"].items()}},
            "method": method, "data": {"adapt": data["adapt"], "eval": data["eval"]}, "output_dir": str(out), **extra}


def plain_logits(directory, images):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(pixel_values=images).logits


@pytest.mark.parametrize("arch", ["vit", "resnet", "convnext"])
def test_encoder_and_head_give_the_classifiers_logits(arch):
    torch.manual_seed(0)
    model = classifier(arch, 3).eval()
    encoder, head = split_classifier(model)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(head(encoder(images)), model(pixel_values=images).logits)
    assert type(model).__name__ in ARCHITECTURES


def test_merged_batch_norm_statistics_carry_a_gradient():
    from torch.func import functional_call

    torch.manual_seed(0)
    model = classifier("resnet", 2).eval()
    encoder, _ = split_classifier(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = encoder(images)
    scale = torch.ones((), requires_grad=True)  # as λ: the merged running stats depend on it
    params = {k: v * scale if "running_" in k else v for k, v in encoder.state_dict().items()}
    features = functional_call(encoder, params, (images,))
    torch.testing.assert_close(features, plain, atol=1e-5, rtol=1e-5)
    features.sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


@pytest.mark.parametrize("method", [{"name": "ties", "options": {"density": 0.5}}, {"name": "task_arithmetic"},
                                    {"name": "adamerging", "trainer": TRAINER}, {"name": "symerge", "trainer": TRAINER}],
                         ids=lambda m: m["name"])
def test_merge_exports_and_reloads_with_identical_logits(pool, data, tmp_path, method):
    out = tmp_path / "out"
    result, out = run_merge(config(pool, data, out, method, export={"task_models": True}), progress=False)
    meta = json.loads((out / "symerge.json").read_text())
    assert meta["family"] == "hf_image" and meta["architecture"].endswith("ForImageClassification")
    assert meta["metrics"]["samples"] == {"pets": 4, "cars": 6}
    assert (out / "encoder" / "preprocessor_config.json").is_file()
    loaded = symerge.load(out)
    images = torch.randn(3, 3, pool["size"], pool["size"])
    for task, names in LABELS.items():
        ours = result.predict(task, images)
        assert ours.shape == (3, len(names))
        assert torch.equal(loaded.predict(task, images), ours)
        assert torch.equal(plain_logits(out / "tasks" / task, images), ours)  # plain transformers
        assert meta["tasks"][task]["class_names"] == names


def test_default_export_rebuilds_task_models_and_surgery_reloads(pool, data, tmp_path):
    out = tmp_path / "ta"
    result, out = run_merge(config(pool, data, out, {"name": "task_arithmetic"}), progress=False)
    assert not (out / "tasks").exists()  # one shared encoder: encoder/ + heads/ are the whole result
    images = torch.randn(2, 3, pool["size"], pool["size"])
    with torch.no_grad():
        assert torch.equal(task_model(out, "cars")(pixel_values=images).logits, result.predict("cars", images))
    result, out = run_merge(config(pool, data, tmp_path / "surgery", {"name": "surgery", "trainer": TRAINER}),
                            progress=False)
    meta = json.loads((out / "symerge.json").read_text())
    assert meta["transformers_dirs_skipped"] and "adapters" in meta["transformers_dirs_skipped"]
    assert torch.equal(symerge.load(out).predict("pets", images), result.predict("pets", images))


def test_bad_inputs_name_the_field(pool, data, tmp_path):
    cfg = config(pool, data, tmp_path / "out", {"name": "ties"})
    other = classifier("convnext" if pool["arch"] != "convnext" else "vit", 3)
    hf_tiny.save(other, tmp_path / "other", with_tokenizer=False)
    bad = json.loads(json.dumps(cfg))
    bad["model"]["experts"]["cars"] = str(tmp_path / "other")
    with pytest.raises(ValidationError, match=r"model\.experts\.cars: expert 'cars' is a ConvNext.* experts must share"):
        run_merge(bad, progress=False)
    bad = json.loads(json.dumps(cfg))
    shutil.copytree(data["eval"]["cars"], tmp_path / "eval-cars")
    (tmp_path / "eval-cars" / "bus").mkdir()
    bad["data"]["eval"]["cars"] = str(tmp_path / "eval-cars")
    with pytest.raises(ValidationError, match=r"data\.eval\.cars: subfolder 'bus' .* is not a class name"):
        run_merge(bad, progress=False)
    bad = json.loads(json.dumps(cfg))
    bad["data"]["eval"]["cars"] = str(tmp_path / "eval-cars" / "sedan" / "img0.png")
    with pytest.raises(ValidationError, match=r"data\.eval\.cars: .* is not a folder"):
        run_merge(bad, progress=False)
    bare = tmp_path / "bare-pre"
    shutil.copytree(pool["pre"], bare)
    (bare / "preprocessor_config.json").unlink()
    bad = json.loads(json.dumps(cfg))
    bad["model"]["pretrained"] = str(bare)
    with pytest.raises(ValidationError, match=r"model\.pretrained: no image processor"):
        run_merge(bad, progress=False)
    assert not (tmp_path / "out").exists()
