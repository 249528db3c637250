"""What a model family is: its config section, and how it loads a pool, reads data, saves and reloads a result.

A family is one class registered with `@register_family`; `symerge merge`, `symerge.load` and the config ask it
instead of branching on its name. Families sit below the pipeline, the config and `export`: they import `models/`,
`pool`, `batching`, `tensorio` and `errors`, never those (the run config reaches them as a duck-typed argument:
`cfg.model` is the family's own section, `cfg.path()` / `cfg.model_source()` resolve paths, `cfg.data` holds the
data options).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from symerge.batching import Inputs
from symerge.errors import FieldError, ValidationError
from symerge.pool import ModelPool
from symerge.tensorio import head_state, save_tensors

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --- the config section ----------------------------------------------------------------------------------------------
class ModelSection(BaseModel):
    """The `model:` section fields every family shares; each family subclasses it with `family: Literal[<name>]`
    and its own fields (the config's `model` is the discriminated union of the registered sections).

    `field_hints` (class variable): for fields of this family given to another one, the message that says so
    (`{family}` is the family given); without a hint such a field is refused as an unknown field."""

    model_config = ConfigDict(extra="forbid")
    field_hints: ClassVar[dict[str, str]] = {}

    family: str
    pretrained: str = Field(min_length=1, description="model dir / file (relative to the config) or hub id")
    experts: dict[str, str] = Field(description="task -> fine-tuned checkpoint")
    class_names: dict[str, list[str]] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="cast every loaded tensor to this dtype; auto: as stored (all must agree)")

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype to cast to, None for auto."""
        import torch

        return None if self.dtype == "auto" else getattr(torch, self.dtype)

    @model_validator(mode="before")
    @classmethod
    def _fields_of_other_families(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in data:
                if key in cls.model_fields:
                    continue
                for family in FAMILIES.values():
                    hint = family.section.field_hints.get(key)
                    if hint:
                        raise FieldError(f"model.{key}", hint.format(family=data.get("family")))
        return data

    @field_validator("experts")
    @classmethod
    def _check_experts(cls, experts: dict[str, str]) -> dict[str, str]:
        if len(experts) < 2:
            raise FieldError("model.experts", f"need at least two experts, got {len(experts)} ({list(experts)})")
        for task, source in experts.items():
            if not TASK_NAME.match(task):
                raise FieldError(f"model.experts.{task}", "task names must start with a letter or digit and use only "
                                 "letters, digits, '_', '.', '-' (they name files in the output)")
            if not source:
                raise FieldError(f"model.experts.{task}", "empty path")
        return experts

    @field_validator("class_names")
    @classmethod
    def _check_class_names(cls, names: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for task, classes in (names or {}).items():
            if not classes:
                raise FieldError(f"model.class_names.{task}", "empty list of class names")
            dup = sorted({c for c in classes if classes.count(c) > 1})
            if dup:
                raise FieldError(f"model.class_names.{task}", f"duplicate class name '{dup[0]}'")
        return names


# --- what a loaded pool carries --------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A family's pool as the pipeline uses it: encoder module, per-task heads, the validated `ModelPool`, labels.

    `state` is the family's own (e.g. the text classifier pool, an image processor); only the family reads it."""

    family: str
    encoder: nn.Module
    heads: dict[str, nn.Module]
    pool: ModelPool
    class_names: dict[str, list[str]] = field(default_factory=dict)
    num_labels: dict[str, int] = field(default_factory=dict)
    state: Any = None

    @property
    def tasks(self) -> list[str]:
        return list(self.pool.tasks)


@dataclass
class ExportInfo:
    """What a family needs besides the `MergeResult` to write (and later rebuild) its models."""

    family: str  # a registered family name
    num_labels: dict[str, int] = field(default_factory=dict)
    class_names: dict[str, list[str]] = field(default_factory=dict)
    architecture: str | None = None  # HF families: the classifier class
    task_configs: dict[str, Any] = field(default_factory=dict)  # HF families: each task's classifier config
    tokenizer: Any = None  # saved next to HF models
    task_models: bool | None = None  # write tasks/<task>/ (None: only for tasks with their own encoder)
    processor: Any = None  # image processor
    normalize: bool = True  # clip: L2-normalised embeddings


def config_fields(cfg: Any) -> list[tuple[str, str]]:
    """(field, value) of model.pretrained and each model.experts.<task>."""
    return [("model.pretrained", cfg.model.pretrained)] + [(f"model.experts.{t}", p) for t, p in cfg.model.experts.items()]


def error_field(err: ValidationError) -> str:
    """The config field a tagged `ValidationError` (see `errors.subject`) is about."""
    if err.about == "pretrained":
        return "model.pretrained"
    if err.about == "expert" and err.task is not None:
        return f"model.experts.{err.task}"
    if err.about == "class_names" and err.task is not None:
        return f"model.class_names.{err.task}"
    return "model"


# --- the family ------------------------------------------------------------------------------------------------------
class Family:
    """One model family. Subclasses set the class variables and implement `load`, `read_inputs` and the
    export / reload pair; errors about a config field are raised as `FieldError(field, why)` (or as a tagged
    `ValidationError`, see `errors.subject`)."""

    name: ClassVar[str]
    section: ClassVar[type[ModelSection]]
    has_forward: ClassVar[bool] = True  # False: weights only (no adaptation, no evaluation)
    regime: ClassVar[str] = "vision"  # the adaptive trainer's default regime ("nlp" / "vision")
    task_models: ClassVar[bool] = False  # can write standalone per-task models (export.task_models)
    reads_converted: ClassVar[bool] = False  # takes a `symerge convert` output as input
    holds_experts: ClassVar[bool] = True  # False: the loaded pool reads expert tensors lazily from their files

    # --- config ---
    def check_inputs(self, cfg: Any, converted: bool) -> None:
        """File-system checks of model.pretrained / model.experts before anything is loaded (raise FieldError)."""

    def class_names_required(self, converted: bool) -> bool:
        """Whether model.class_names must name every task."""
        return False

    def check_data_path(self, path: Path, labeled: bool) -> str | None:
        """Why `path` (it exists) cannot be this family's data, or None."""
        return None

    # --- loading and data ---
    def load(self, cfg: Any, progress: bool = False) -> LoadedModel:
        raise NotImplementedError

    def read_inputs(self, cfg: Any, loaded: LoadedModel, split: str, task: str,
                    class_names: list[str] | None) -> tuple[Inputs, list[int] | None]:
        """Inputs of data.<split>.<task> (labels too when `class_names` is given)."""
        raise FieldError(f"data.{split}.{task}", f"family '{self.name}' has no forward pass to feed data to")

    def count_inputs(self, cfg: Any, path: Path, field_name: str) -> int:
        """Samples in a data path without reading them all (for `symerge plan`)."""
        raise FieldError(field_name, f"family '{self.name}' reads no data")

    def finish_result(self, result: Any, loaded: LoadedModel, cfg: Any) -> None:
        """Attach what predictions on the returned result need (e.g. a tokenizer for raw strings)."""

    def export_info(self, loaded: LoadedModel, cfg: Any) -> ExportInfo:
        return ExportInfo(family=self.name, num_labels=dict(loaded.num_labels), class_names=dict(loaded.class_names),
                          task_models=cfg.export.task_models)

    # --- writing and reading a result ---
    def write_encoder(self, result: Any, root: Path, info: ExportInfo) -> dict[str, Any]:
        """Write the merged encoder under `root`; returns symerge.json's `encoder` entry."""
        raise NotImplementedError

    def write_head(self, task: str, head: nn.Module, root: Path, info: ExportInfo) -> None:
        save_tensors(head_state(head), root / "heads" / f"{task}.safetensors")

    def write_task_models(self, result: Any, root: Path, info: ExportInfo) -> tuple[dict[str, str], str | None]:
        """Standalone per-task models (tasks/<task>/): (task -> dir written, reason none were written or None)."""
        return {}, None

    def load_result(self, root: Path, meta: Mapping[str, Any]) -> tuple[nn.Module, dict[str, nn.Module], Any]:
        """(encoder, heads, tokenizer or None) of a written result."""
        raise NotImplementedError

    def task_model(self, root: Path, meta: Mapping[str, Any], task: str, verify: bool, load: Any) -> nn.Module:
        """A plain per-task model of a written result (`load(root, verify=...)` rebuilds the `MergeResult`)."""
        raise ValidationError(f"'{root}': task models exist for famil{'y' if len(task_model_families()) == 1 else 'ies'} "
                              f"{', '.join(repr(f) for f in task_model_families())} only, not '{self.name}'")


def standalone_tasks(result: Any, info: ExportInfo) -> list[str]:
    """The tasks that get a standalone classifier in tasks/<task>/ (families with `task_models`).

    Each is a full encoder copy, so by default (`task_models=None`) only tasks whose encoder differs from the
    shared one (per-task overrides: EMR, SyMerge block mode) get one: for them encoder/ + heads/ is not the task's
    model. Otherwise the shared encoder/ plus the small heads/ are the whole result (`task_model` rebuilds a
    classifier from them on demand). `task_models=True` writes every task, `False` none."""
    if not get_family(info.family).task_models or info.task_models is False:
        return []
    if info.task_models:
        return list(result.tasks)
    return [t for t in result.tasks if result.task_overrides.get(t)]


# --- the registry ----------------------------------------------------------------------------------------------------
FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register a family under `cls.name` (its section's `family` literal)."""
    if cls.name in FAMILIES:
        raise ValueError(f"model family '{cls.name}' registered twice")
    FAMILIES[cls.name] = cls()
    return cls


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValidationError(f"unknown model family '{name}'; known: {list(FAMILIES)}")
    return FAMILIES[name]


def family_names() -> list[str]:
    return list(FAMILIES)


def task_model_families() -> list[str]:
    return [n for n, f in FAMILIES.items() if f.task_models]


def forward_families() -> list[str]:
    return [n for n, f in FAMILIES.items() if f.has_forward]


def model_section_type() -> Any:
    """The config's `model` type: the registered sections as a union discriminated by `family`."""
    from typing import Annotated, Union

    sections = tuple(f.section for f in FAMILIES.values())
    return Annotated[Union[sections], Field(discriminator="family")]  # type: ignore[valid-type]

