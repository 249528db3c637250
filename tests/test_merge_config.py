"""`symerge merge CONFIG.yaml`: config validation, bad input (clear error, nothing written), every model family."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import hf_tiny
import symerge
from symerge import ValidationError
from symerge.cli import main
from symerge.config import parse_config

LABELS = {"alpha": 2, "beta": 3}
TRAINER = {"steps": 3, "batch_size": 4, "progress": False}


base_config = hf_tiny.merge_config


def run(tmp_path, config, *args):
    path = hf_tiny.write_config(tmp_path / "config.yaml", **config)
    return main(["merge", str(path), *args])


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dir left


# --- bad input: each a clear error, exit 2, nothing written ----------------------------------------------------------
def copy_expert(bert, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(bert["experts"]["beta"], target)
    return target


def missing_file(cfg, bert, tmp_path):
    cfg["model"]["experts"]["beta"] = str(tmp_path / "no-such-dir")


def garbage_safetensors(cfg, bert, tmp_path):
    target = copy_expert(bert, tmp_path)
    (target / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    cfg["model"]["experts"]["beta"] = str(target)


def truncated_safetensors(cfg, bert, tmp_path):
    target = copy_expert(bert, tmp_path)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg["model"]["experts"]["beta"] = str(target)


def not_a_model(cfg, bert, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("hello")
    cfg["model"]["experts"]["beta"] = str(tmp_path / "notes")


def three_layers(cfg, bert, tmp_path):
    torch.manual_seed(1)
    model = hf_tiny.classifier_class("bert")(hf_tiny.config("bert", 3, layers=3))
    cfg["model"]["experts"]["beta"] = str(hf_tiny.save(model, tmp_path / "deeper"))


def nan_weights(cfg, bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(bert["experts"]["beta"])
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, :3] = float("nan")
    cfg["model"]["experts"]["beta"] = str(hf_tiny.save(model, tmp_path / "nan"))


def wrong_class_names(cfg, bert, tmp_path):
    cfg["model"]["class_names"] = {"alpha": ["neg", "neutral", "pos"]}


def unknown_method(cfg, bert, tmp_path):
    cfg["method"] = {"name": "tiez"}


def unknown_static_option(cfg, bert, tmp_path):
    cfg["method"] = {"name": "ties", "options": {"densty": 0.2}}


def unknown_adaptive_option(cfg, bert, tmp_path):
    cfg["method"] = {"name": "symerge", "options": {"task_layr": "head"}, "trainer": TRAINER}


def mismatched_task_names(cfg, bert, tmp_path):
    cfg["method"] = {"name": "symerge", "trainer": TRAINER}
    cfg["data"]["adapt"] = {"alpha": bert["adapt"]["alpha"], "gamma": bert["adapt"]["beta"]}


def missing_text_column(cfg, bert, tmp_path):
    cfg["method"] = {"name": "adamerging", "trainer": TRAINER}
    cfg["data"]["text_column"] = "sentence"


def wrong_field(cfg, bert, tmp_path):
    cfg["model"]["family"] = "onnx"
    cfg["metod"] = {"name": "ties"}


def trainer_typo(cfg, bert, tmp_path):
    cfg["method"] = {"name": "symerge", "trainer": {"stepz": 3}}


BAD_INPUTS = {
    missing_file: r"model\.experts\.beta: expert 'beta'.*no-such-dir' does not exist",
    garbage_safetensors: r"expert 'beta'.*model\.safetensors' is not a valid safetensors file \(corrupt or truncated\)",
    truncated_safetensors: r"expert 'beta'.*model\.safetensors' is not a valid safetensors file.*incomplete",
    not_a_model: r"expert 'beta'.*notes' is not a Hugging Face model directory \(no config\.json\)",
    three_layers: r"expert 'beta': unexpected tensor 'encoder\.layer\.2\..*' not in the pretrained model",
    nan_weights: r"model\.experts\.beta: expert 'beta': tensor 'encoder\.layer\.1\.output\.dense\.weight' has 3 non-finite value",
    wrong_class_names: r"model\.class_names\.alpha: 3 class names, but expert 'alpha' has 2 labels \(head tensor "
                       r"'classifier\.bias' has output width 2\)",
    unknown_method: r"method\.name: unknown method 'tiez'; static: \[.*'ties'.*\]; adaptive: \[.*'symerge'.*\]",
    unknown_static_option: r"method\.options\.densty: method 'ties' has no option 'densty'; valid options: \[.*'density'",
    unknown_adaptive_option: r"method\.options\.task_layr: method 'symerge' has no option 'task_layr'; valid options: "
                             r"\[.*'task_layer'",
    mismatched_task_names: r"data\.adapt: task names do not match model\.experts \['alpha', 'beta'\]: missing \['beta'\], "
                           r"unknown \['gamma'\]",
    missing_text_column: r"data\.adapt\.alpha: '.*adapt-alpha\.csv' has no column 'sentence' \(columns: \['text'\]\)",
    wrong_field: r"model\.family: Input should be 'hf_text', 'clip', 'state_dict' or 'hf_image' \(got 'onnx'\)(.|\n)*"
                 r"metod: Extra inputs are not permitted",
    trainer_typo: r"method\.trainer\.stepz: Extra inputs are not permitted",
}


@pytest.mark.parametrize("mutate", list(BAD_INPUTS), ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_gives_a_clear_error_and_writes_nothing(bert, tmp_path, capsys, mutate):
    out = tmp_path / "out"
    cfg = copy.deepcopy(base_config(bert, out))
    mutate(cfg, bert, tmp_path)
    assert run(tmp_path, cfg) == 2
    err = capsys.readouterr().err
    assert err.startswith("symerge: error: ")
    assert __import__("re").search(BAD_INPUTS[mutate], err), err
    assert_nothing_written(out)


def test_existing_output_dir_is_refused_unless_overwrite(bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    cfg = base_config(bert, out)
    assert run(tmp_path, cfg) == 2
    assert "output_dir: '" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []
    assert run(tmp_path, cfg, "--overwrite") == 2  # not a symerge output: --overwrite never deletes it
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    assert run(tmp_path, cfg) == 0 and (out / "symerge.json").is_file()  # an empty dir is fine
    assert run(tmp_path, cfg) == 2  # now a previous output: replaced only with --overwrite
    assert run(tmp_path, cfg, "--overwrite") == 0
    cfg["overwrite"] = True  # the config's own flag works too
    assert run(tmp_path, cfg) == 0


def test_output_dir_inside_an_input_is_refused(bert, tmp_path, capsys):
    cfg = base_config(bert, bert["experts"]["alpha"] / "merged")
    assert run(tmp_path, cfg, "--overwrite") == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert not (bert["experts"]["alpha"] / "merged").exists()


def test_config_rules_name_the_field(bert, tmp_path):
    out = tmp_path / "out"
    sd_file = str(bert["pre"] / "model.safetensors")
    cases = [
        (lambda c: c["method"].update(trainer={"steps": 3}), r"method\.trainer: 'ties' is a static method"),
        (lambda c: c.update(method={"name": "symerge", "trainer": {"seed": 3}}),
         r"method\.trainer\.seed: set the top-level 'seed'"),
        (lambda c: c.update(method={"name": "symerge"}, data={}), r"data\.adapt: adaptive method 'symerge' needs unlabeled"),
        (lambda c: c["data"].update(eval={"gamma": bert["eval"]["beta"]}), r"data\.eval: .*unknown \['gamma'\]"),
        (lambda c: c["model"].update(class_names={"delta": ["x"]}), r"model\.class_names: .*unknown \['delta'\]"),
        (lambda c: c["model"].update(templates=["a photo of {}."]), r"model\.templates: prompt templates are for family 'clip'"),
        (lambda c: c["model"].update(experts={"a/b": "x", "c": "y"}), r"model\.experts\.a/b: task names must start"),
        (lambda c: c["model"].update(experts={"alpha": "x"}), r"model\.experts: need at least two experts"),
        (lambda c: c["data"].update(adapt={"alpha": "nope.csv", "beta": "nope.csv"}),
         r"data\.adapt\.alpha: '.*nope\.csv' does not exist"),
        (lambda c: c["data"].update(eval={"beta": str(bert["pre"] / "model.safetensors")}),
         r"data\.eval\.beta: 'model\.safetensors': unknown text data format '\.safetensors'"),
        (lambda c: c["data"].update(eval={"beta": str(bert["pre"] / "vocab.txt")}),
         r"data\.eval\.beta: 'vocab\.txt': a \.txt file holds texts without labels"),
        (lambda c: c.update(device="gpu"), r"device: 'gpu' is not a device"),
        (lambda c: c.update(seed="zero"), r"seed: Input should be a valid integer"),
        (lambda c: (c["model"].update(family="state_dict", pretrained=sd_file), c.update(method={"name": "symerge"})),
         r"method\.name: adaptive method 'symerge' needs a model with a forward pass"),
    ]
    (bert["pre"] / "vocab.txt").write_text("x")
    for mutate, pattern in cases:
        cfg = copy.deepcopy(base_config(bert, out))
        mutate(cfg)
        with pytest.raises(ValidationError) as info:
            parse_config(cfg, tmp_path)
        assert __import__("re").search(pattern, str(info.value)), (pattern, str(info.value))
    with pytest.raises(ValidationError, match="does not exist"):
        symerge.config.load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValidationError, match="not valid YAML"):
        symerge.config.load_config(tmp_path / "broken.yaml")


def test_relative_paths_resolve_against_the_config_file(bert, tmp_path):
    root = bert["root"]
    cfg = base_config(bert, "merged-rel")
    cfg["model"]["pretrained"] = bert["pre"].name
    cfg["model"]["experts"] = {t: p.name for t, p in bert["experts"].items()}
    cfg["data"] = {"eval": {t: p.split("/")[-1] for t, p in bert["eval"].items()}, "max_len": hf_tiny.MAX_LEN}
    path = hf_tiny.write_config(root / "relative.yaml", **cfg)
    assert main(["merge", str(path), "--overwrite"]) == 0
    meta = json.loads((root / "merged-rel" / "symerge.json").read_text())
    assert meta["inputs"]["config"]["sha256"] and set(meta["metrics"]["accuracy"]) == set(LABELS)
    assert meta["tasks"]["alpha"]["class_names"] == ["alpha0", "alpha1"]


# --- the state_dict family -------------------------------------------------------------------------------------------
def test_state_dict_family_merges_safetensors_files(tmp_path, capsys):
    from safetensors.torch import save_file

    from symerge.merging import merge

    g = torch.Generator().manual_seed(0)
    pre = {"enc.weight": torch.randn(6, 4, generator=g), "enc.bias": torch.randn(6, generator=g),
           "head.weight": torch.randn(2, 6, generator=g)}
    experts = {}
    for i, task in enumerate(["a", "b"]):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items() if not k.startswith("head.")}
        state["head.weight"] = torch.randn(2 + i, 6, generator=g)
        save_file(state, str(tmp_path / f"{task}.safetensors"))
        experts[task] = state
    save_file(pre, str(tmp_path / "pre.safetensors"))
    cfg = {"model": {"family": "state_dict", "pretrained": "pre.safetensors", "head_prefixes": ["head."],
                     "experts": {"a": "a.safetensors", "b": "b.safetensors"}, "class_names": {"b": ["x", "y", "z"]}},
           "method": {"name": "ties", "options": {"density": 0.5}}, "output_dir": "out"}
    assert main(["merge", str(hf_tiny.write_config(tmp_path / "sd.yaml", **cfg))]) == 0
    loaded = symerge.load(tmp_path / "out")
    expected = merge("ties", {k: v for k, v in pre.items() if k.startswith("enc.")},
                     {t: {k: v for k, v in s.items() if k.startswith("enc.")} for t, s in experts.items()}, density=0.5)
    for key, value in expected.items():
        torch.testing.assert_close(loaded.encoder_state[key], value, atol=0, rtol=0)
    assert torch.equal(loaded.heads["b"].state_dict()["head.weight"], experts["b"]["head.weight"])
    with pytest.raises(symerge.SymergeError, match="no architecture"):
        loaded.encoder(torch.zeros(1, 4))
    cfg["model"]["class_names"] = {"b": ["x", "y"]}
    cfg["output_dir"] = "out2"
    assert main(["merge", str(hf_tiny.write_config(tmp_path / "sd.yaml", **cfg))]) == 2
    assert "model.class_names.b: task 'b': head tensor 'head.weight' has output width 3, but 2 classes are declared" \
        in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# --- the clip family -------------------------------------------------------------------------------------------------
CLASSES = {"cars": ["sedan", "truck", "van"], "dtd": ["striped", "dotted"]}


def test_clip_family_merges_adapts_and_reloads(tmp_path, monkeypatch):
    pytest.importorskip("symerge.models.clip")
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    from symerge.pipeline import run_merge

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    pre, experts = hf_tiny.make_clip(tmp_path, list(CLASSES))
    adapt = {t: str(hf_tiny.write_images(tmp_path / "adapt" / t, 6, i)) for i, t in enumerate(CLASSES)}
    evals = {}
    for i, (task, names) in enumerate(CLASSES.items()):
        for j, name in enumerate(names):
            hf_tiny.write_images(tmp_path / "eval" / task / name, 2, 100 + 10 * i + j)
        evals[task] = str(tmp_path / "eval" / task)
    model = {"family": "clip", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()},
             "class_names": CLASSES, "templates": ["a photo of a {}.", "art of the {}."]}
    data = {"adapt": adapt, "eval": evals}
    images = torch.randn(3, 3, 16, 16)
    for method in ({"name": "ties"}, {"name": "symerge", "trainer": TRAINER}):
        cfg = {"model": model, "method": method, "data": data, "output_dir": str(tmp_path / method["name"])}
        result, out = run_merge(cfg, progress=False)
        loaded = symerge.load(out)
        meta = json.loads((out / "symerge.json").read_text())
        assert set(meta["metrics"]["accuracy"]) == set(CLASSES) and meta["metrics"]["samples"] == {"cars": 6, "dtd": 4}
        hf = CLIPVisionModelWithProjection.from_pretrained(out / "encoder").eval()  # plain transformers
        for task in CLASSES:
            ours = loaded.predict(task, images)
            torch.testing.assert_close(ours, result.predict(task, images), atol=1e-5, rtol=0)
            head = load_file(str(out / "heads" / f"{task}.safetensors"))
            with torch.no_grad():
                embeds = torch.nn.functional.normalize(hf(pixel_values=images).image_embeds, dim=-1)
            torch.testing.assert_close(embeds @ head["weight"].T + head["bias"], ours, atol=1e-5, rtol=0)
            assert ours.shape == (3, len(CLASSES[task]))
    bad = {"model": {**model, "class_names": {"cars": CLASSES["cars"]}}, "method": {"name": "ties"},
           "output_dir": str(tmp_path / "bad")}
    with pytest.raises(ValidationError, match=r"model\.class_names: task names do not match .*missing \['dtd'\]"):
        run_merge(bad)
    assert not (tmp_path / "bad").exists()
