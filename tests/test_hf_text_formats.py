"""Hugging Face text classifiers in (encoder / head split per architecture), merge results out (export + load)."""

from __future__ import annotations

import json

import pytest
import torch

import hf_tiny
import symerge
from symerge import ValidationError
from symerge.cli import main
from symerge.models.hf_text import load_text_classifier_pool, split_classifier, supported_architectures

LABELS = {"alpha": 2, "beta": 3}


def tiny_configs():
    import transformers

    common = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=40, num_labels=3)
    return {
        "BertForSequenceClassification": transformers.BertConfig(**common),
        "AlbertForSequenceClassification": transformers.AlbertConfig(embedding_size=16, **common),
        "RobertaForSequenceClassification": transformers.RobertaConfig(**common),
        "XLMRobertaForSequenceClassification": transformers.XLMRobertaConfig(**common),
        "CamembertForSequenceClassification": transformers.CamembertConfig(**common),
        "ElectraForSequenceClassification": transformers.ElectraConfig(embedding_size=16, **common),
        "DistilBertForSequenceClassification": transformers.DistilBertConfig(
            vocab_size=60, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=40, num_labels=3),
        "DebertaV2ForSequenceClassification": transformers.DebertaV2Config(**common),
    }


def batch(n: int = 5, seed: int = 99) -> dict[str, torch.Tensor]:
    enc = hf_tiny.tokenizer()(hf_tiny.texts(n, seed), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_every_supported_architecture_splits_into_encoder_and_head_with_identical_logits():
    import transformers

    configs = tiny_configs()
    assert sorted(configs) == supported_architectures()
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    for name, config in configs.items():
        model = getattr(transformers, name)(config).eval()
        encoder, head = split_classifier(model)
        base_keys = set(model.base_model.state_dict())
        assert set(encoder.state_dict()) == base_keys, name
        assert not set(head.state_dict()) & {f"{model.base_model_prefix}.{k}" for k in base_keys}
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            got = head(encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family,base_pretrained", [("bert", True), ("roberta", False), ("distilbert", True)])
def test_pool_from_dirs_reproduces_each_expert(tmp_path, family, base_pretrained):
    from torch.func import functional_call

    pre, experts = hf_tiny.make_pool(tmp_path, family, LABELS, base_pretrained=base_pretrained)
    tp = load_text_classifier_pool(pre, experts)
    cls = hf_tiny.classifier_class(family)
    assert tp.tasks == ["alpha", "beta"] and tp.num_labels == LABELS
    assert tp.class_names["beta"] == ["beta0", "beta1", "beta2"]
    assert tp.pool.num_classes == LABELS
    assert set(tp.pool.pretrained) == set(cls(hf_tiny.config(family)).base_model.state_dict())
    inputs = batch()
    for task, path in experts.items():
        features = functional_call(tp.encoder, tp.pool.experts[task], (), dict(inputs))
        with torch.no_grad():
            torch.testing.assert_close(tp.heads[task](features), hf_tiny.hf_logits(path, inputs), atol=1e-5, rtol=0)
    assert tp.tokenize(["w1 w2"], 8)["input_ids"].shape == (1, 8)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    pre, experts = hf_tiny.make_pool(tmp_path, "bert", LABELS)
    gpt = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                                   pad_token_id=0))
    hf_tiny.save(gpt, tmp_path / "gpt2", with_tokenizer=False)
    with pytest.raises(ValidationError, match="GPT2ForSequenceClassification.*not supported"):
        load_text_classifier_pool(pre, {"alpha": experts["alpha"], "gpt": tmp_path / "gpt2"})
    with pytest.raises(ValidationError, match="not a sequence classifier"):
        load_text_classifier_pool(pre, {"alpha": experts["alpha"], "base": pre})


def run_config(tmp_path, name, pre, experts, method, data=None, **extra):
    config = hf_tiny.write_config(
        tmp_path / f"{name}.yaml",
        model={"family": "hf_text", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()}},
        method=method, data=data or {}, output_dir=str(tmp_path / name), **extra,
    )
    assert main(["merge", str(config)]) == 0
    return tmp_path / name


def check_outputs(out, inputs, reference=None):
    """symerge.load and plain transformers agree (and match `reference` predictions when given)."""
    loaded = symerge.load(out)
    meta = json.loads((out / "symerge.json").read_text())
    for task in loaded.tasks:
        ours = loaded.predict(task, inputs)
        if reference is not None:
            torch.testing.assert_close(ours, reference.predict(task, inputs), atol=1e-5, rtol=0)
        if meta["tasks"][task]["transformers_dir"]:
            torch.testing.assert_close(hf_tiny.hf_logits(out / "tasks" / task, inputs), ours, atol=1e-5, rtol=0)
    return loaded, meta


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_merge_static_and_adaptive_then_reload_with_plain_transformers(tmp_path, family):
    from transformers import AutoConfig

    pre, experts = hf_tiny.make_pool(tmp_path, family, LABELS, base_pretrained=family != "roberta")
    adapt, evals = hf_tiny.write_data(tmp_path, LABELS)
    inputs = batch()
    data = {"adapt": adapt, "eval": evals, "max_len": hf_tiny.MAX_LEN}
    out = run_config(tmp_path, "ties", pre, experts, {"name": "ties", "options": {"density": 0.5}}, data,
                     export={"task_models": True})  # standalone tasks/<task>/ dirs are opt-in without overrides
    loaded, meta = check_outputs(out, inputs)
    assert meta["method"] == "ties" and meta["options"]["density"] == 0.5 and meta["seed"] == 0
    assert set(meta["metrics"]["accuracy"]) == set(LABELS)
    assert meta["inputs"]["model.experts.alpha"]["sha256"]["config.json"]
    assert meta["tasks"]["beta"]["class_names"] == ["beta0", "beta1", "beta2"]
    config = AutoConfig.from_pretrained(out / "tasks" / "beta")
    assert config.num_labels == 3 and config.id2label[2] == "beta2"
    assert (out / "encoder" / "config.json").is_file() and (out / "heads" / "alpha.safetensors").is_file()
    if family == "distilbert":
        return  # the adaptive path is the same for every family; two are enough to keep the suite fast
    trainer = {"steps": 3, "batch_size": 4, "progress": False}
    out = run_config(tmp_path, "symerge", pre, experts, {"name": "symerge", "trainer": trainer}, data, seed=3)
    loaded, meta = check_outputs(out, inputs)
    assert meta["trainer"]["steps"] == 3 and meta["trainer"]["seed"] == 3 and meta["trainer"]["regime"] == "nlp"
    assert loaded.lambdas is not None and loaded.lambdas.shape == (len(loaded.lambda_rows), 2)
    assert json.loads((out / "lambdas.json").read_text())["tasks"] == ["alpha", "beta"]
    assert len(loaded.loss_history) == 3


def test_per_task_encoders_and_adapters_round_trip(tmp_path):
    """EMR and SyMerge block mode carry each task's own encoder into tasks/<task>; Surgery's adapters only load
    through symerge.load (no transformers dirs are written for it)."""
    from transformers import AutoModelForSequenceClassification

    from symerge.pipeline import run_merge

    pre, experts = hf_tiny.make_pool(tmp_path, "bert", LABELS)
    adapt, _ = hf_tiny.write_data(tmp_path, LABELS)
    inputs = batch()
    base = {"model": {"family": "hf_text", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()}},
            "data": {"adapt": adapt, "max_len": hf_tiny.MAX_LEN}}
    trainer = {"steps": 2, "batch_size": 4, "progress": False}
    methods = {
        "emr": {"name": "emr"},
        "block": {"name": "symerge", "options": {"task_layer": "block:encoder.layer.1."}, "trainer": trainer},
        "surgery": {"name": "surgery", "options": {"rank": 4}, "trainer": trainer},
    }
    for name, method in methods.items():
        result, out = run_merge({**base, "method": method, "output_dir": str(tmp_path / name)}, progress=False)
        loaded, meta = check_outputs(out, inputs, reference=result)
        if name == "surgery":
            assert set(loaded.adapters) == set(LABELS) and not (out / "tasks").exists()
            assert "adapters" in meta["transformers_dirs_skipped"]
        else:
            assert set(loaded.task_overrides) == set(LABELS) and (out / "overrides" / "alpha.safetensors").is_file()
            saved = {t: AutoModelForSequenceClassification.from_pretrained(out / "tasks" / t).base_model.state_dict()
                     for t in LABELS}
            for task in LABELS:  # each per-task dir carries that task's own encoder
                own = loaded.encoder_params(task)
                assert all(torch.equal(saved[task][k], own[k]) for k in own)
            assert any(not torch.equal(saved["alpha"][k], saved["beta"][k]) for k in saved["alpha"])


def test_load_refuses_a_directory_that_is_not_a_merge_output(tmp_path):
    with pytest.raises(ValidationError, match="no symerge.json"):
        symerge.load(tmp_path)
    with pytest.raises(ValidationError, match="does not exist"):
        symerge.load(tmp_path / "nope")
