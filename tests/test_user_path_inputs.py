"""What a new user feeds `symerge merge` and `symerge.load`: raw text, bad options, relative paths, missing models,
adaptation data, mixed precisions, and what the command prints (issue 13, items 10-16)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

import hf_tiny
import symerge
from symerge import ValidationError
from symerge.cli import main
from symerge.config import parse_config
from symerge.pipeline import run_merge

LABELS = {"alpha": 2, "beta": 3}
TRAINER = {"steps": 2, "batch_size": 4, "progress": False}


base_config = hf_tiny.merge_config


def copy_expert(bert, tmp_path, task="beta"):
    target = tmp_path / f"copy-{task}"
    shutil.copytree(bert["experts"][task], target)
    return target


# --- item 10: predict on raw strings ----------------------------------------------------------------------------
def test_predict_accepts_raw_strings(bert, tmp_path):
    from symerge.models.text import tokenize

    result, out = run_merge(base_config(bert, tmp_path / "out"), progress=False)
    texts = hf_tiny.texts(5, seed=3)
    want = result.predict("alpha", tokenize(hf_tiny.tokenizer(), texts, hf_tiny.MAX_LEN))
    assert torch.allclose(result.predict("alpha", texts), want)
    loaded = symerge.load(out)
    assert torch.allclose(loaded.predict("alpha", texts), want, atol=1e-6)
    assert loaded.predict("beta", texts[0]).shape == (1, 3)  # one string is one sample
    assert loaded.features("beta", texts).shape[0] == 5


def test_raw_strings_without_tokenizer_is_a_clear_error(bert, tmp_path):
    result, _ = run_merge(base_config(bert, tmp_path / "out"), progress=False)
    result.tokenizer = None
    with pytest.raises(ValidationError, match="tokenizer"):
        result.predict("alpha", ["w1 w2"])


# --- item 11: every option validated before loading, naming the field ---------------------------------------------
@pytest.mark.parametrize("method, field", [
    ({"name": "ties", "options": {"density": "high"}}, "method.options.density"),
    ({"name": "ties", "options": {"density": 7}}, "method.options.density"),
    ({"name": "ties", "options": {"scaling_coef": "x"}}, "method.options.scaling_coef"),
    ({"name": "dare", "options": {"drop_rate": 1.5}}, "method.options.drop_rate"),
    ({"name": "dare", "options": {"base": "ties", "density": -0.5}}, "method.options.density"),
    ({"name": "task_arithmetic", "options": {"scaling_coef": [1, 2]}}, "method.options.scaling_coef"),
    ({"name": "symerge", "options": {"filter_rule": "bogus"}, "trainer": TRAINER}, "method.options.filter_rule"),
    ({"name": "symerge", "options": {"granularity": 3}, "trainer": TRAINER}, "method.options.granularity"),
    ({"name": "adamerging", "options": {"init": "high"}, "trainer": TRAINER}, "method.options.init"),
    ({"name": "symerge", "options": {"clamp": "yes"}, "trainer": TRAINER}, "method.options.clamp"),
])
def test_bad_option_is_refused_at_config_time_naming_the_field(bert, tmp_path, monkeypatch, method, field):
    import symerge.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded models before validating options"))
    path = hf_tiny.write_config(tmp_path / "config.yaml", **base_config(bert, tmp_path / "out", method))
    with pytest.raises(ValidationError) as info:
        run_merge(path, progress=False)
    assert f"config.yaml': {field}" in str(info.value) or f"{field}:" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, name", [({"scaling_coef": "x"}, "scaling_coef"), ({"density": "high"}, "density")])
def test_python_merge_names_a_mistyped_option(options, name):
    import symerge.merging as merging

    base = {"w": torch.randn(3, 3)}
    experts = {"a": {"w": torch.randn(3, 3)}, "b": {"w": torch.randn(3, 3)}}
    with pytest.raises(ValidationError, match=f"option '{name}'"):
        merging.merge("ties", base, experts, **options)


def test_every_static_method_default_options_validate(bert, tmp_path):
    from symerge.merging import available_methods, get_method

    for name in available_methods():
        cfg = base_config(bert, tmp_path / "out", {"name": name, "options": dict(get_method(name).defaults)})
        parse_config(cfg)  # the declared defaults are valid values of the declared types


def test_shape_mismatch_names_the_tensor(bert, tmp_path):
    target = copy_expert(bert, tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}
    config["label2id"] = {f"c{i}": i for i in range(5)}
    (target / "config.json").write_text(json.dumps(config))
    cfg = base_config(bert, tmp_path / "out")
    cfg["model"]["experts"]["beta"] = str(target)
    with pytest.raises(ValidationError) as info:
        run_merge(cfg, progress=False)
    message = str(info.value)
    assert "model.experts.beta" in message and "classifier.weight" in message and "above report" not in message
    assert "(3, 32)" in message or "[3, 32]" in message


@pytest.fixture
def no_suite_runs(monkeypatch):
    """A bench command that got past its option checks fails the test at once instead of running a benchmark."""
    for suite in ("text", "vision", "dense"):
        monkeypatch.setattr(f"symerge.suites.{suite}.run_{suite}_suite",
                            lambda *a, **k: pytest.fail("the suite ran despite a bad option"))


def test_bench_unknown_task_is_a_clear_error(capsys, tmp_path, no_suite_runs):
    for suite in ("text", "vision", "dense"):
        assert main(["bench", suite, "--tasks", "nosuch", "--out", str(tmp_path / suite)]) == 2
        err = capsys.readouterr().err
        assert "nosuch" in err and "--tasks" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads", "-2"]])
def test_bench_threads_must_be_positive(capsys, args, no_suite_runs):
    with pytest.raises(SystemExit) as info:
        main(["bench", "text", *args])
    assert info.value.code == 2
    assert "--threads" in capsys.readouterr().err


# --- item 12: relative checkpoint_path --------------------------------------------------------------------------
def test_relative_checkpoint_path_is_relative_to_the_config(bert, tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    trainer = {**TRAINER, "checkpoint_every": 1, "checkpoint_path": "ckpt/state.pt"}
    method = {"name": "adamerging", "trainer": trainer}
    path = hf_tiny.write_config(cfg_dir / "config.yaml", **base_config(bert, cfg_dir / "out", method))
    assert main(["merge", str(path), "--no-progress"]) == 0
    assert (cfg_dir / "ckpt" / "state.pt").is_file()
    assert not (elsewhere / "ckpt").exists()


# --- item 13: a missing local path is not a hub id; the hub is tried once -----------------------------------------
@pytest.fixture
def hub_online(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset (as for a new user), with an empty hub cache."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("value", ["models/nosuch", "./nosuch", "models/sub/nosuch"])
def test_missing_local_path_fails_at_once(bert, tmp_path, monkeypatch, hub_online, value):
    cfg_dir = tmp_path / "project"
    (cfg_dir / "models").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = base_config(bert, cfg_dir / "out")
    cfg["model"]["experts"]["beta"] = value
    path = hf_tiny.write_config(cfg_dir / "config.yaml", **cfg)
    start = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        run_merge(path, progress=False)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "model.experts.beta" in message and "does not exist" in message and "hub" not in message


def test_unreachable_hub_id_is_tried_once(bert, tmp_path, hub_online):
    cfg = base_config(bert, tmp_path / "out")
    cfg["model"]["experts"]["beta"] = "no-such-org/no-such-model"
    start = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        run_merge(cfg, progress=False)
    assert time.perf_counter() - start < 10, "retried the hub"
    assert "model.experts.beta" in str(info.value) and "no-such-org/no-such-model" in str(info.value)


def test_clip_sources_follow_the_same_rules(tmp_path, monkeypatch, hub_online):
    from symerge.models.clip import _model_source

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match="does not exist"):
        _model_source("models/nosuch", "pretrained CLIP model")
    start = time.perf_counter()
    with pytest.raises(ValidationError, match="no-such-org/no-such-model"):
        _model_source("no-such-org/no-such-model", "pretrained CLIP model")
    assert time.perf_counter() - start < 10


# --- item 14: what `symerge merge` prints -------------------------------------------------------------------------
def test_merge_prints_metrics_output_and_phase_times(bert, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress bars are drawn on a terminal only
    cfg = base_config(bert, tmp_path / "out")
    cfg["data"]["eval"] = dict(bert["eval"])
    path = hf_tiny.write_config(tmp_path / "config.yaml", **cfg)
    assert main(["merge", str(path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for task in LABELS:
        assert any(line.strip().startswith(f"| {task}") for line in out.splitlines()), out
    assert "accuracy" in out and "average" in out
    assert str(tmp_path / "out") in out
    for phase in ("load", "merge", "evaluate", "export"):
        assert f"{phase}" in out
    assert " s" in out
    # progress bars for loading and evaluation (tqdm writes to stderr)
    assert "load" in captured.err and "evaluate" in captured.err


# --- item 15: adaptation data -------------------------------------------------------------------------------------
def test_plain_text_adaptation_data(bert, tmp_path):
    adapt = {}
    for task in LABELS:
        adapt[task] = tmp_path / f"{task}.txt"
        adapt[task].write_text("\n".join(hf_tiny.texts(8, seed=1)) + "\n\n", encoding="utf-8")
    cfg = base_config(bert, tmp_path / "out", {"name": "symerge", "trainer": TRAINER})
    cfg["data"]["adapt"] = {t: str(p) for t, p in adapt.items()}
    result, _ = run_merge(cfg, progress=False)
    assert result.lambdas is not None


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_adaptation_file_of_empty_texts_is_an_error(bert, tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    if suffix == ".txt":
        empty.write_text("\n  \n\n", encoding="utf-8")
    elif suffix == ".csv":
        hf_tiny.write_csv(empty, [{"text": ""}, {"text": "  "}])
    else:
        hf_tiny.write_jsonl(empty, [{"text": ""}, {"text": " "}])
    cfg = base_config(bert, tmp_path / "out", {"name": "symerge", "trainer": TRAINER})
    cfg["data"]["adapt"]["alpha"] = str(empty)
    with pytest.raises(ValidationError) as info:
        run_merge(cfg, progress=False)
    assert "data.adapt.alpha" in str(info.value) and empty.name in str(info.value)


def test_txt_is_refused_for_labeled_eval_data(bert, tmp_path):
    txt = tmp_path / "eval.txt"
    txt.write_text("w1 w2\n", encoding="utf-8")
    cfg = base_config(bert, tmp_path / "out")
    cfg["data"]["eval"] = {"alpha": str(txt)}
    with pytest.raises(ValidationError, match="data.eval.alpha"):
        parse_config(cfg)


def test_zero_adaptation_steps_is_an_error(bert, tmp_path):
    cfg = base_config(bert, tmp_path / "out", {"name": "symerge", "trainer": {**TRAINER, "steps": 0}})
    with pytest.raises(ValidationError, match="method.trainer.steps"):
        parse_config(cfg)


# --- item 16: precisions ------------------------------------------------------------------------------------------
def cast_expert(bert, tmp_path, dtype, task="beta"):
    from transformers import AutoModelForSequenceClassification

    target = tmp_path / f"{task}-{str(dtype).split('.')[-1]}"
    model = AutoModelForSequenceClassification.from_pretrained(bert["experts"][task], dtype=torch.float32).to(dtype)
    hf_tiny.save(model, target)
    return target


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mixed_precision_names_the_remedy_and_model_dtype_fixes_it(bert, tmp_path, dtype):
    cfg = base_config(bert, tmp_path / "out")
    cfg["model"]["experts"]["beta"] = str(cast_expert(bert, tmp_path, dtype))
    with pytest.raises(ValidationError) as info:
        run_merge(cfg, progress=False)
    assert "model.dtype: float32" in str(info.value)
    cfg["model"]["dtype"] = "float32"
    result, out = run_merge(cfg, progress=False)
    assert all(v.dtype == torch.float32 for v in result.encoder_state.values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in result.heads["beta"].state_dict().values())


def test_model_dtype_casts_everything(bert, tmp_path):
    cfg = base_config(bert, tmp_path / "out")
    cfg["model"]["dtype"] = "bfloat16"
    result, _ = run_merge(cfg, progress=False)
    assert {v.dtype for v in result.encoder_state.values() if v.is_floating_point()} == {torch.bfloat16}


def test_model_dtype_must_be_known(bert, tmp_path):
    cfg = base_config(bert, tmp_path / "out")
    cfg["model"]["dtype"] = "float8"
    with pytest.raises(ValidationError, match="model.dtype"):
        parse_config(cfg)


def test_state_dict_family_mixed_precision(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = {"w": torch.randn(4, 4), "head.w": torch.randn(2, 4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, dtype in enumerate((torch.bfloat16, torch.float32)):
        save_file({k: (v + 0.1 * i).to(dtype) for k, v in base.items()}, str(tmp_path / f"e{i}.safetensors"))
    cfg = {"model": {"family": "state_dict", "pretrained": "base.safetensors", "head_prefixes": ["head."],
                     "experts": {"a": "e0.safetensors", "b": "e1.safetensors"}},
           "method": {"name": "task_arithmetic"}, "output_dir": "out"}
    path = hf_tiny.write_config(tmp_path / "config.yaml", **cfg)
    with pytest.raises(ValidationError, match="model.dtype: float32"):
        run_merge(path, progress=False)
    cfg["model"]["dtype"] = "float32"
    path = hf_tiny.write_config(tmp_path / "config.yaml", **cfg)
    result, _ = run_merge(path, progress=False)
    assert result.encoder_state["w"].dtype == torch.float32


def test_unexpected_expert_tensor_is_refused(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    target = copy_expert(bert, tmp_path)
    state = load_file(str(target / "model.safetensors"))
    state["bert.extra_tensor"] = torch.zeros(3)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    cfg = base_config(bert, tmp_path / "out")
    cfg["model"]["experts"]["beta"] = str(target)
    with pytest.raises(ValidationError) as info:
        run_merge(cfg, progress=False)
    assert "model.experts.beta" in str(info.value) and "extra_tensor" in str(info.value)
