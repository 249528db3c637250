"""Tiny random Hugging Face text classifiers saved as model dirs (no downloads), data files and merge configs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]  # [PAD] = 1, as RoBERTa's padding_idx expects
VOCAB = SPECIAL + WORDS
MAX_LEN = 12
LABELS = {"alpha": 2, "beta": 3}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 0), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def config(family: str, num_labels: int = 2, layers: int = 2):
    import transformers

    common = dict(vocab_size=len(VOCAB), num_labels=num_labels, pad_token_id=1, max_position_embeddings=40)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=layers, n_heads=2, hidden_dim=64, **common)
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]
    return cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, **common)


def classifier_class(family: str):
    import transformers

    return {"bert": transformers.BertForSequenceClassification, "roberta": transformers.RobertaForSequenceClassification,
            "distilbert": transformers.DistilBertForSequenceClassification}[family]


def save(model, path: Path, with_tokenizer: bool = True) -> Path:
    from transformers.utils import logging

    logging.disable_progress_bar()
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer().save_pretrained(path)
    return path


def make_pool(root: Path, family: str = "bert", labels: dict[str, int] | None = None, seed: int = 0,
              base_pretrained: bool = True) -> tuple[Path, dict[str, Path]]:
    """A pretrained dir (the bare base model, or a classifier when `base_pretrained=False`) and expert classifier
    dirs fine-tuned from it (perturbed base weights, own random heads, own num_labels)."""
    labels = labels or {"alpha": 2, "beta": 3}
    torch.manual_seed(seed)
    pre = classifier_class(family)(config(family, 2)).eval()
    pre_dir = root / f"{family}-pretrained"
    save(pre.base_model if base_pretrained else pre, pre_dir)
    experts = {}
    for i, (task, n) in enumerate(labels.items()):
        expert = classifier_class(family)(config(family, n)).eval()
        expert.config.id2label = {j: f"{task}{j}" for j in range(n)}
        expert.config.label2id = {f"{task}{j}": j for j in range(n)}
        with torch.no_grad():
            base = pre.base_model.state_dict()
            gen = torch.Generator().manual_seed(seed * 100 + i + 1)
            expert.base_model.load_state_dict(
                {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()}
            )
        experts[task] = save(expert, root / f"{family}-{task}")
    return pre_dir, experts


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(n)]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_data(root: Path, labels: dict[str, int], n: int = 12) -> tuple[dict[str, str], dict[str, str]]:
    """Adaptation data (first task CSV, others JSONL; unlabeled) and labeled eval data (labels as names / ints)."""
    adapt, evals = {}, {}
    for i, (task, k) in enumerate(labels.items()):
        rows = [{"text": t} for t in texts(n, seed=i)]
        writer = write_csv if i == 0 else write_jsonl
        adapt[task] = str(writer(root / f"adapt-{task}.{'csv' if i == 0 else 'jsonl'}", rows))
        labeled = [{"text": t, "label": (f"{task}{j % k}" if i == 0 else j % k)} for j, t in enumerate(texts(n, seed=10 + i))]
        evals[task] = str(writer(root / f"eval-{task}.{'csv' if i == 0 else 'jsonl'}", labeled))
    return adapt, evals


def merge_config(pool: dict[str, Any], out: Path, method: dict[str, Any] | None = None, adapt: bool = True,
                 **extra: Any) -> dict[str, Any]:
    """A `symerge merge` config (as a dict) for the conftest `bert` pool."""
    data: dict[str, Any] = {"max_len": MAX_LEN}
    if adapt:
        data["adapt"] = dict(pool["adapt"])
    return {
        "model": {"family": "hf_text", "pretrained": str(pool["pre"]),
                  "experts": {t: str(p) for t, p in pool["experts"].items()}},
        "method": method or {"name": "ties", "options": {"density": 0.5}},
        "data": data,
        "output_dir": str(out),
        **extra,
    }


def write_config(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path


def hf_logits(model_dir: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a saved classifier loaded with plain transformers."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --- CLIP (family "clip") ---------------------------------------------------------------------------------------------
def make_clip(root: Path, tasks: list[str]) -> tuple[Path, dict[str, Path]]:
    """A pretrained CLIPModel dir (with a word-level tokenizer) and CLIPVisionModel expert dirs fine-tuned from it."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    config = CLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    pre_dir = save(model, root / "clip-pretrained")
    experts = {}
    for i, task in enumerate(tasks):
        expert = CLIPVisionModel(config.vision_config)
        tower = getattr(expert, "vision_model", expert)
        tower.load_state_dict(getattr(model.vision_model, "vision_model", model.vision_model).state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * (i + 1) * torch.randn_like(p))
        experts[task] = save(expert, root / f"clip-{task}", with_tokenizer=False)
    return pre_dir, experts


def write_images(folder: Path, n: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(20 + i % 3, 18, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def word_bert_dir(path: Path, words: list[str], numbered: int, pairs: bool = False) -> Path:
    """A random 2-layer BERT and a word-level tokenizer over `words` plus the tokens n0 … n{numbered-1}; with
    `pairs`, the tokenizer encodes a pair as `[CLS] a [SEP] b [SEP]` with token types 0 / 1, as BERT's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"n{i}" for i in range(numbered)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra: dict[str, Any] = {}
    if pairs:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        extra["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", **extra)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path
