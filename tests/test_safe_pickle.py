"""Restricted unpickling of task_vectors-style whole-module checkpoints, `symerge convert`, and refusal of pickles
that try to run code. Stand-in classes carry the original names (src.modeling.ImageEncoder, open_clip.model.CLIP,
open_clip.transformer.*), registered as fake modules only while a test pickles them."""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from symerge import ValidationError
from symerge.models.clip import load_converted_pool
from symerge.models.convert import convert_task_vectors_dir, register_convert_command
from symerge.models.safe_pickle import InertObject, load_state_dict, module_classes, safe_load

WIDTH, PATCH, IMAGE, PROJ = 64, 8, 16, 16

# legacy torch.save looks for the source of module classes; the stand-ins have none
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")


def fake_module(monkeypatch, name):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def named(monkeypatch, module, qualname, bases, body):
    """A class whose __module__ / __qualname__ are the original's, findable by pickle while the test runs."""
    cls = type(qualname, bases, body)
    cls.__module__, cls.__qualname__ = module, qualname
    setattr(sys.modules[module], qualname, cls)
    return cls


@pytest.fixture
def standins(monkeypatch):
    """Minimal open_clip / task_vectors classes with the original names and module structure (and forwards)."""
    for name in ["src", "src.modeling", "open_clip", "open_clip.model", "open_clip.transformer", "open_clip.transform"]:
        fake_module(monkeypatch, name)

    def ln_forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    LayerNorm = named(monkeypatch, "open_clip.transformer", "LayerNorm", (nn.LayerNorm,), {"forward": ln_forward})
    QuickGELU = named(monkeypatch, "open_clip.transformer", "QuickGELU", (nn.Module,),
                      {"forward": lambda self, x: x * torch.sigmoid(1.702 * x)})

    def block_init(self, width, heads):
        nn.Module.__init__(self)
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def block_forward(self, x):
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.ln_2(x))

    Block = named(monkeypatch, "open_clip.transformer", "ResidualAttentionBlock", (nn.Module,),
                  {"__init__": block_init, "forward": block_forward})

    def transformer_init(self, width, layers, heads):
        nn.Module.__init__(self)
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.resblocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])

    def transformer_forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x

    Transformer = named(monkeypatch, "open_clip.transformer", "Transformer", (nn.Module,),
                        {"__init__": transformer_init, "forward": transformer_forward})

    def vit_init(self, width=WIDTH, layers=2, heads=1, patch=PATCH, image=IMAGE, proj=PROJ):
        nn.Module.__init__(self)
        grid = image // patch
        self.image_size, self.grid_size, self.output_dim = (image, image), (grid, grid), proj
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, proj))

    def vit_forward(self, x):  # open_clip VisionTransformer.forward
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj

    VisionTransformer = named(monkeypatch, "open_clip.transformer", "VisionTransformer", (nn.Module,),
                              {"__init__": vit_init, "forward": vit_forward})

    def clip_init(self):
        nn.Module.__init__(self)
        self.visual = VisionTransformer()
        self.token_embedding = nn.Embedding(10, 8)  # text side (task_vectors deletes only `transformer`)
        self.positional_embedding = nn.Parameter(torch.randn(4, 8))
        self.ln_final = LayerNorm(8)
        self.text_projection = nn.Parameter(torch.randn(8, PROJ))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("attn_mask", torch.ones(4, 4), persistent=False)

    CLIP = named(monkeypatch, "open_clip.model", "CLIP", (nn.Module,), {"__init__": clip_init})

    def convert_to_rgb(image):
        return image

    convert_to_rgb.__module__, convert_to_rgb.__qualname__ = "open_clip.transform", "_convert_to_rgb"
    sys.modules["open_clip.transform"]._convert_to_rgb = convert_to_rgb

    def compose_init(self, transforms):
        self.transforms = transforms

    Compose = named(monkeypatch, "open_clip.transform", "Compose", (object,), {"__init__": compose_init})

    def encoder_init(self):
        nn.Module.__init__(self)
        self.model = CLIP()
        self.train_preprocess = Compose([convert_to_rgb, {"mean": (0.48, 0.45, 0.40)}])
        self.val_preprocess = Compose([convert_to_rgb])
        self.cache_dir = None

    ImageEncoder = named(monkeypatch, "src.modeling", "ImageEncoder", (nn.Module,),
                         {"__init__": encoder_init, "forward": lambda self, x: self.model.visual(x)})

    def head_init(self, normalize, weights, biases=None):
        out_features, in_features = weights.shape
        nn.Linear.__init__(self, in_features, out_features)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

    def head_forward(self, x):
        if self.normalize:
            x = x / x.norm(dim=-1, keepdim=True)
        return nn.Linear.forward(self, x)

    Head = named(monkeypatch, "src.modeling", "ClassificationHead", (nn.Linear,),
                 {"__init__": head_init, "forward": head_forward})
    return types.SimpleNamespace(ImageEncoder=ImageEncoder, ClassificationHead=Head)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def perturbed(encoder, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return encoder


@pytest.fixture
def task_vectors_dir(standins, tmp_path):
    """zeroshot.pt (zip), A/finetuned.pt (zip), B/finetuned.pt (legacy torch.save), head_A.pt (zip),
    head_B.pt (plain pickle.dump, as some task_vectors forks save), plus an unrelated file."""
    torch.manual_seed(0)
    src = tmp_path / "checkpoints" / "ViT-B-32"
    (src / "A").mkdir(parents=True)
    (src / "B").mkdir()
    pretrained = standins.ImageEncoder().eval()
    torch.save(pretrained, src / "zeroshot.pt")
    experts = {"A": standins.ImageEncoder(), "B": standins.ImageEncoder()}
    for task, seed in (("A", 1), ("B", 2)):
        experts[task].load_state_dict(pretrained.state_dict())
        perturbed(experts[task], 0.02, seed).eval()
    torch.save(experts["A"], src / "A" / "finetuned.pt")
    torch.save(experts["B"], src / "B" / "finetuned.pt", _use_new_zipfile_serialization=False)
    heads = {"A": standins.ClassificationHead(True, torch.randn(3, PROJ)),
             "B": standins.ClassificationHead(True, torch.randn(5, PROJ), torch.randn(5))}
    torch.save(heads["A"], src / "head_A.pt")
    with open(src / "head_B.pt", "wb") as handle:
        pickle.dump(heads["B"], handle)
    (src / "README.txt").write_text("not a checkpoint")
    return types.SimpleNamespace(src=src, pretrained=pretrained, experts=experts, heads=heads)


def test_safe_load_reads_whole_module_pickles_in_every_format(task_vectors_dir):
    tv = task_vectors_dir
    for path, module in [(tv.src / "zeroshot.pt", tv.pretrained), (tv.src / "A" / "finetuned.pt", tv.experts["A"]),
                         (tv.src / "B" / "finetuned.pt", tv.experts["B"]), (tv.src / "head_B.pt", tv.heads["B"])]:
        state = load_state_dict(path)
        want = module.state_dict()
        assert list(state) == list(want)
        for key in want:
            assert torch.equal(state[key], want[key]) and state[key].dtype == want[key].dtype, (path, key)
    graph = safe_load(tv.src / "zeroshot.pt")
    assert isinstance(graph, InertObject) and graph.class_path == "src.modeling.ImageEncoder"
    classes = module_classes(graph)
    assert classes["model"] == "open_clip.model.CLIP"
    assert classes["model.visual.transformer.resblocks.0.mlp.gelu"] == "open_clip.transformer.QuickGELU"
    assert classes["model.visual.transformer.resblocks.0.attn"] == "torch.nn.modules.activation.MultiheadAttention"
    assert "model.attn_mask" not in load_state_dict(tv.src / "zeroshot.pt")  # non-persistent buffer, as state_dict()
    assert safe_load(tv.src / "head_A.pt").attributes()["normalize"] is True


def test_convert_writes_safetensors_and_hashes_and_runs_through_hf_clip(task_vectors_dir, tmp_path):
    tv = task_vectors_dir
    out = tmp_path / "converted"
    manifest = convert_task_vectors_dir(tv.src, out)
    assert manifest["pretrained"] == "zeroshot.safetensors"
    assert manifest["experts"] == {"A": "A/finetuned.safetensors", "B": "B/finetuned.safetensors"}
    assert manifest["heads"] == {"A": "head_A.safetensors", "B": "head_B.safetensors"}
    assert manifest["tasks"] == ["A", "B"] and manifest["incomplete"] == {} and manifest["ignored"] == ["README.txt"]
    assert json.loads((out / "convert.json").read_text()) == manifest
    for name, info in manifest["files"].items():
        assert info["input_sha256"] == sha256(tv.src / info["input"])
        assert info["sha256"] == sha256(out / name) == manifest["outputs_sha256"][name]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [*manifest["files"], "convert.json"])
    for name, module in [("zeroshot.safetensors", tv.pretrained), ("A/finetuned.safetensors", tv.experts["A"]),
                         ("B/finetuned.safetensors", tv.experts["B"])]:
        got, want = load_file(out / name), module.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    head = load_file(out / "head_B.safetensors")
    assert torch.equal(head["weight"], tv.heads["B"].weight) and torch.equal(head["bias"], tv.heads["B"].bias)
    info = manifest["files"]["A/finetuned.safetensors"]
    assert info["root_class"] == "src.modeling.ImageEncoder" and info["hidden_act"] == "quick_gelu"
    assert info["hf_vision_config"]["hidden_size"] == WIDTH and info["hf_vision_config"]["projection_dim"] == PROJ
    assert manifest["files"]["head_A.safetensors"]["normalize"] is True
    assert manifest["files"]["head_A.safetensors"]["num_classes"] == 3

    # the converted checkpoints run through the HF CLIP path and reproduce the original models' logits
    encoder, heads, pool = load_converted_pool(out)
    assert pool.tasks == ["A", "B"]
    images = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        for task in ("A", "B"):
            want = tv.heads[task](tv.experts[task](images))
            got = heads[task](torch.func.functional_call(encoder, pool.experts[task], (images,)))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValidationError, match="exists and is not empty"):
        convert_task_vectors_dir(tv.src, out)
    (out / "marker").write_text("old")
    assert convert_task_vectors_dir(tv.src, out, overwrite=True)["tasks"] == ["A", "B"]
    assert not (out / "marker").exists()


def test_convert_cli_command(task_vectors_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="symerge")
    register_convert_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", str(task_vectors_dir.src), str(tmp_path / "out")])
    assert args.func(args) == 0
    assert "experts:    A, B" in capsys.readouterr().out
    assert (tmp_path / "out" / "convert.json").is_file()


def test_lenient_layout_reports_what_it_found(task_vectors_dir, tmp_path):
    src = task_vectors_dir.src
    (src / "zeroshot.pt").rename(src / "A" / "zeroshot.pt")
    (src / "head_B.pt").unlink()
    manifest = convert_task_vectors_dir(src, tmp_path / "out")
    assert manifest["pretrained"] == "A/zeroshot.safetensors" and manifest["task_zeroshot"] == {"A": "A/zeroshot.safetensors"}
    assert manifest["incomplete"] == {"B": ["head"]} and any("as the pretrained" in n for n in manifest["notes"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="no task_vectors checkpoints"):
        convert_task_vectors_dir(tmp_path / "empty", tmp_path / "out2")


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


class EvilPopen:
    def __reduce__(self):
        return (subprocess.Popen, (["touch", "/tmp/never"],))


class EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_is_refused_and_nothing_is_written(task_vectors_dir, tmp_path):
    src = task_vectors_dir.src
    flag = tmp_path / "PWNED"
    # a legitimate-looking expert that smuggles a payload inside its state
    payload = {"state_dict": task_vectors_dir.experts["B"].state_dict(), "extra": Evil(flag)}
    torch.save(payload, src / "B" / "finetuned.pt")
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as err:
        convert_task_vectors_dir(src, out)
    message = str(err.value)
    assert "B/finetuned.pt" in message and ("posix.system" in message or "nt.system" in message)
    assert "refused" in message
    assert not flag.exists()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp dir left behind


@pytest.mark.parametrize("payload,name,legacy", [
    (EvilPopen(), "subprocess.Popen", False), (EvilEval(), "builtins.eval", True), (EvilEval(), "builtins.eval", None)])
def test_refused_globals(payload, name, legacy, tmp_path):
    path = tmp_path / "evil.pt"
    if legacy is None:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValidationError, match=f"evil.pt: refused to unpickle global '{name}'"):
        safe_load(path)


def test_corrupt_and_odd_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3).t(), "h": torch.ones(3, dtype=torch.bfloat16)}, good)
    state = load_state_dict(good)
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3).t()) and state["h"].dtype == torch.bfloat16
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValidationError, match="trunc.pt"):
        safe_load(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a pickle")
    with pytest.raises(ValidationError, match="not a readable PyTorch checkpoint"):
        safe_load(tmp_path / "junk.pt")
    with pytest.raises(ValidationError, match="no such file"):
        safe_load(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValidationError, match="neither a module nor a dict of tensors"):
        load_state_dict(tmp_path / "list.pt")
