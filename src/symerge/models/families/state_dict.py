"""Family `state_dict`: plain safetensors files (or dirs of shards), no architecture — static merges only; task
heads are the tensors under `model.head_prefixes`; exports encoder.safetensors and heads/<task>.safetensors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from symerge.errors import FieldError, ValidationError, subject
from symerge.models.families.base import (Family, LoadedModel, ModelSection, config_fields, error_field,
                                          register_family)
from symerge.pool import ModelPool
from symerge.tensorio import TensorStore, load_tensors, read_lazily, save_tensors


class StateDictModel(ModelSection):
    field_hints: ClassVar[dict[str, str]] = {
        "head_prefixes": "head prefixes are for family 'state_dict' (for '{family}' the head is found from the "
                         "architecture)",
    }

    family: Literal["state_dict"]
    head_prefixes: list[str] | None = Field(default=None, description="state_dict: tensor-name prefixes of task heads")

    @model_validator(mode="after")
    def _heads_need_prefixes(self) -> "StateDictModel":
        if self.class_names and not self.head_prefixes:
            raise FieldError("model.class_names", "family 'state_dict' has no heads unless model.head_prefixes is set")
        return self


@register_family
class StateDict(Family):
    name = "state_dict"
    section = StateDictModel
    has_forward: ClassVar[bool] = False
    holds_experts: ClassVar[bool] = False  # tensors read one at a time from the files (`tensorio.read_lazily`)

    def check_inputs(self, cfg: Any, converted: bool) -> None:
        for field_name, value in config_fields(cfg):
            path = cfg.path(value)
            if not path.exists():
                raise FieldError(field_name, f"'{path}' does not exist")

    def load(self, cfg: Any, progress: bool = False) -> LoadedModel:
        dtype = cfg.model.torch_dtype
        try:
            with subject("pretrained"):
                pre = read_lazily(cfg.path(cfg.model.pretrained), "pretrained", dtype)
            experts = {}  # lazy: validated and merged tensor by tensor, straight from the files
            for task, value in cfg.model.experts.items():
                with subject("expert", task):
                    experts[task] = read_lazily(cfg.path(value), f"expert '{task}'", dtype)
            names = {t: list(v) for t, v in (cfg.model.class_names or {}).items()}
            prefixes = list(cfg.model.head_prefixes or [])
            pool = ModelPool.from_models(pre, experts, head_prefixes=prefixes,
                                         num_classes={t: len(n) for t, n in names.items()})
        except ValidationError as err:
            raise FieldError(error_field(err), err) from None
        heads: dict[str, nn.Module] = {t: TensorStore(pool.heads.get(t, {})) for t in pool.tasks}
        widths = {t: int(list(h.values())[-1].shape[0]) for t, h in pool.heads.items() if h}
        return LoadedModel(self.name, TensorStore(pool.pretrained), heads, pool, names, widths)

    def write_encoder(self, result: Any, root: Path, info: Any) -> dict[str, Any]:
        save_tensors(result.encoder_state, root / "encoder.safetensors")
        return {"format": "safetensors", "path": "encoder.safetensors"}

    def load_result(self, root: Path, meta: Mapping[str, Any]) -> tuple[nn.Module, dict[str, nn.Module], Any]:
        encoder = TensorStore(load_tensors(root / meta["encoder"]["path"], "merged encoder"))
        heads: dict[str, nn.Module] = {t: TensorStore(load_tensors(root / meta["tasks"][t]["head"], f"head of task '{t}'"))
                                       for t in meta["tasks"]}
        return encoder, heads, None
