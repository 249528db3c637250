"""Sentence encoders on Hugging Face transformer bodies (mean pooling over tokens), and their tokenization."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn


class MeanPooledEncoder(nn.Module):
    """A transformer body followed by attention-masked mean pooling: inputs -> [B, hidden] sentence features."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    @property
    def hidden_size(self) -> int:
        return int(self.body.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.body(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def load_text_encoder(path: str | Path) -> tuple[MeanPooledEncoder, object]:
    """Load an HF encoder body and its tokenizer from a local directory (or a hub id when online)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler's "unexpected keys" report is noise here
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    body = AutoModel.from_pretrained(str(path), add_pooling_layer=False) if _has_pooler_arg(path) else AutoModel.from_pretrained(str(path))
    body.eval()
    return MeanPooledEncoder(body), tokenizer


def _has_pooler_arg(path: str | Path) -> bool:
    """BERT-like bodies accept add_pooling_layer; the pooler is unused by mean pooling, so drop it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path)).model_type in {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


def tokenize(tokenizer: object, texts: Sequence[str], max_len: int,
             second: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Pad every text to `max_len` (batches are trimmed to their longest text later); with `second`, each pair is read
    as one sequence (`[CLS] a [SEP] b [SEP]`, token type ids 0 / 1), truncated longest text first."""
    pair = () if second is None else (list(second),)
    enc = tokenizer(list(texts), *pair, padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def linear_head(hidden: int, num_classes: int, seed: int) -> nn.Linear:
    """A freshly initialised linear classifier, seeded."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, num_classes)
    with torch.no_grad():
        bound = 1.0 / hidden**0.5
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.zero_()
    return head
