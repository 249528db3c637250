"""The `symerge merge CONFIG.yaml` config: one validated file naming models, method, data and output.

    model:
      family: hf_text                 # hf_text | clip | state_dict
      pretrained: bert-base-uncased   # dir (relative to this file) or hub id
      experts: {sst2: ckpt/sst2, trec: ckpt/trec}
    method: {name: symerge, options: {task_layer: head}, trainer: {steps: 200, batch_size: 16}}
    data: {adapt: {sst2: data/sst2.csv, trec: data/trec.jsonl}}
    output_dir: out/merged

Every error names the field (dotted path, e.g. `method.options.densty`) and why; task names must agree between
`model.experts`, `model.class_names` and `data.*`. Relative paths are relative to the config file's directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from symerge.adaptive.config import TrainerConfig
from symerge.devices import check_precision, device_problem
from symerge.errors import ValidationError

FAMILIES = ("hf_text", "clip", "state_dict")
ADAPTIVE = ("adamerging", "surgery", "symerge")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt")  # .txt: one unlabeled text per line (adaptation only)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Strict):
    family: Literal["hf_text", "clip", "state_dict"]
    pretrained: str = Field(min_length=1, description="model dir / file (relative to the config) or hub id")
    experts: dict[str, str] = Field(description="task -> fine-tuned checkpoint")
    class_names: dict[str, list[str]] | None = None
    templates: list[str] | None = Field(default=None, description="clip: prompt templates with '{}'")
    head_prefixes: list[str] | None = Field(default=None, description="state_dict: tensor-name prefixes of task heads")
    normalize: bool = Field(default=True, description="clip: L2-normalise image embeddings before the head")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="cast every loaded tensor to this dtype; auto: as stored (all must agree)")

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype to cast to, None for auto."""
        import torch

        return None if self.dtype == "auto" else getattr(torch, self.dtype)


class MethodSection(Strict):
    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    trainer: TrainerConfig | None = None
    storage_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="dtype the task vectors τ are held in during the merge / adaptation: bfloat16 "
        "halves their memory (θ = θ_pre + Σ λ τ is still computed in fp32); see `symerge plan`")


class DataSection(Strict):
    adapt: dict[str, str] = Field(default_factory=dict, description="task -> unlabeled adaptation data")
    eval: dict[str, str] = Field(default_factory=dict, description="task -> labeled evaluation data")
    text_column: str = "text"
    label_column: str = "label"
    max_len: int = Field(default=128, ge=1)
    batch_size: int = Field(default=64, ge=1, description="batch size of inference passes")


class ExportSection(Strict):
    """What the output holds besides symerge.json, encoder/ and heads/ (see `symerge.export`)."""

    task_models: bool | None = Field(
        default=None, description="hf_text: also write tasks/<task>/, a standalone transformers classifier per task "
        "(a full encoder copy each). Default: only for tasks with their own encoder tensors (EMR, SyMerge block mode)")


class MergeConfig(Strict):
    model: ModelSection
    method: MethodSection
    data: DataSection = Field(default_factory=DataSection)
    seed: int = 0
    device: str = "cpu"
    output_dir: str = Field(min_length=1)
    overwrite: bool = False
    export: ExportSection = Field(default_factory=ExportSection)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<dict>")

    # --- derived ------------------------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str:
        return self._source

    @property
    def tasks(self) -> list[str]:
        return list(self.model.experts)

    @property
    def adaptive(self) -> bool:
        return self.method.name in ADAPTIVE

    def path(self, value: str) -> Path:
        """A config path: absolute, or relative to the config file's directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def model_source(self, value: str) -> str:
        """A local path (relative to the config dir) when the value is one — it exists, starts with '/', '.' or
        '~', or its parent directory exists — else the string as given (a hub id)."""
        path = self.path(value)
        parent_exists = Path(value).parent != Path(".") and path.parent.is_dir()
        if path.exists() or parent_exists or Path(value).expanduser().is_absolute() or value.startswith((".", "~")):
            return str(path)
        return value

    @property
    def output_path(self) -> Path:
        return self.path(self.output_dir)

    def trainer_config(self) -> TrainerConfig:
        regime = "nlp" if self.model.family == "hf_text" else "vision"
        trainer = self.method.trainer or TrainerConfig(regime=regime)
        fields = trainer.model_fields_set
        update: dict[str, Any] = {"seed": self.seed, "device": self.device}
        if "regime" not in fields:
            update["regime"] = regime
        if trainer.checkpoint_path is not None:  # relative to the config file, like every path here
            update["checkpoint_path"] = self.path(str(trainer.checkpoint_path))
        return trainer.model_copy(update=update)

    def method_options(self) -> dict[str, Any]:
        return dict(self.method.options)


# --- loading -------------------------------------------------------------------------------------------------------
def dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def wrap_pydantic(err: pydantic.ValidationError, source: str) -> ValidationError:
    lines = []
    for item in err.errors():
        value = item.get("input")
        shown = "" if item["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {dotted(tuple(item['loc']))}: {item['msg']}{shown}")
    return ValidationError(f"invalid config {source}:\n" + "\n".join(lines))


def parse_config(data: Any, base_dir: str | Path | None = None, source: str = "<dict>",
                 overwrite: bool | None = None) -> MergeConfig:
    """Validate a config mapping (paths relative to `base_dir`) — schema first, then every cross-field rule.
    `overwrite=True` (the CLI's --overwrite) overrides the file's `overwrite`."""
    if not isinstance(data, dict):
        raise ValidationError(f"invalid config {source}: the top level must be a mapping, got {type(data).__name__}")
    if overwrite:
        data = {**data, "overwrite": True}
    try:
        cfg = MergeConfig.model_validate(data)
    except pydantic.ValidationError as err:
        raise wrap_pydantic(err, source) from None
    cfg._base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    cfg._source = source
    check_config(cfg)
    return cfg


def load_config(path: str | Path, overwrite: bool | None = None) -> MergeConfig:
    """Read and validate a YAML (or JSON) config file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"config file '{path}' does not exist" if not path.exists() else f"config '{path}' is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValidationError(f"config '{path}' is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValidationError(f"config '{path}' is not UTF-8 text: {err}") from None
    return parse_config(data, path.resolve().parent, f"'{path}'", overwrite)


# --- cross-field rules --------------------------------------------------------------------------------------------
def fail(cfg: MergeConfig, field: str, why: str) -> ValidationError:
    return ValidationError(f"invalid config {cfg.source}: {field}: {why}")


def known_methods() -> tuple[list[str], list[str]]:
    from symerge.merging import available_methods

    return available_methods(), list(ADAPTIVE)


def check_method_options(cfg: MergeConfig) -> None:
    """Every option of the method — name, declared type, value — before anything is loaded; the options are kept
    coerced to their declared types (e.g. a YAML list to a tuple)."""
    from symerge.method_options import OptionError, check_adaptive_options, check_static_options

    method = cfg.method
    check = check_adaptive_options if method.name in ADAPTIVE else check_static_options
    try:
        method.options = check(method.name, dict(method.options), len(cfg.tasks))
    except OptionError as err:
        raise fail(cfg, f"method.options.{err.option}" if err.option else "method.options", str(err)) from None
    trainer = method.trainer
    if trainer is not None and trainer.steps is not None and trainer.steps < 1:
        raise fail(cfg, "method.trainer.steps", f"{trainer.steps} adaptation steps would return the initial merge "
                   "untrained; use ≥ 1 (or a static method such as task_arithmetic)")


def check_task_sets(cfg: MergeConfig, field: str, names: list[str], exact: bool) -> None:
    tasks = cfg.tasks
    unknown = [n for n in names if n not in tasks]
    missing = [t for t in tasks if t not in names] if exact else []
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unknown {unknown}")
        raise fail(cfg, field, f"task names do not match model.experts {tasks}: " + ", ".join(parts))


def check_config(cfg: MergeConfig) -> None:
    model, method, data = cfg.model, cfg.method, cfg.data
    # tasks
    if len(cfg.tasks) < 2:
        raise fail(cfg, "model.experts", f"need at least two experts, got {len(cfg.tasks)} ({cfg.tasks})")
    for task, source in model.experts.items():
        if not TASK_NAME.match(task):
            raise fail(cfg, f"model.experts.{task}", "task names must start with a letter or digit and use only "
                       "letters, digits, '_', '.', '-' (they name files in the output)")
        if not source:
            raise fail(cfg, f"model.experts.{task}", "empty path")
    # method and options
    static, adaptive = known_methods()
    if method.name not in static and method.name not in adaptive:
        raise fail(cfg, "method.name", f"unknown method '{method.name}'; static: {static}; adaptive: {adaptive}")
    check_method_options(cfg)
    if method.name in adaptive:
        if method.trainer is not None:
            for name in ("seed", "device"):
                if name in method.trainer.model_fields_set:
                    raise fail(cfg, f"method.trainer.{name}", f"set the top-level '{name}' instead")
        if model.family == "state_dict":
            raise fail(cfg, "method.name", f"adaptive method '{method.name}' needs a model with a forward pass "
                       f"(family hf_text or clip); family 'state_dict' supports the static methods {static}")
    else:
        if method.trainer is not None:
            raise fail(cfg, "method.trainer", f"'{method.name}' is a static method; only adaptive methods {adaptive} "
                       "take a trainer block")
    # family-specific model fields
    if cfg.export.task_models and model.family != "hf_text":
        raise fail(cfg, "export.task_models", f"standalone per-task models are written for family 'hf_text' only, not "
                   f"'{model.family}' (load the output with symerge.load)")
    if model.family == "clip" and model.dtype not in ("auto", "float32"):
        raise fail(cfg, "model.dtype", f"family 'clip' is always loaded in float32 (got '{model.dtype}')")
    if model.family != "clip" and model.templates is not None:
        raise fail(cfg, "model.templates", f"prompt templates are for family 'clip', not '{model.family}'")
    if model.family != "state_dict" and model.head_prefixes is not None:
        raise fail(cfg, "model.head_prefixes", f"head prefixes are for family 'state_dict' (for '{model.family}' the "
                   "head is found from the architecture)")
    if model.templates is not None:
        if not model.templates:
            raise fail(cfg, "model.templates", "empty list")
        for i, template in enumerate(model.templates):
            if "{}" not in template:
                raise fail(cfg, f"model.templates.{i}", f"template {template!r} has no '{{}}' for the class name")
    converted = check_converted_input(cfg)
    names = model.class_names or {}
    check_task_sets(cfg, "model.class_names", list(names), exact=model.family == "clip" and not converted)
    for task, classes in names.items():
        if not classes:
            raise fail(cfg, f"model.class_names.{task}", "empty list of class names")
        dup = sorted({c for c in classes if classes.count(c) > 1})
        if dup:
            raise fail(cfg, f"model.class_names.{task}", f"duplicate class name '{dup[0]}'")
    if model.family == "state_dict":
        for field_name, value in [("model.pretrained", model.pretrained)] + [(f"model.experts.{t}", p) for t, p in model.experts.items()]:
            path = cfg.path(value)
            if not path.exists():
                raise fail(cfg, field_name, f"'{path}' does not exist")
        if names and not model.head_prefixes:
            raise fail(cfg, "model.class_names", "family 'state_dict' has no heads unless model.head_prefixes is set")
    # data
    if cfg.adaptive:
        if not data.adapt:
            raise fail(cfg, "data.adapt", f"adaptive method '{method.name}' needs unlabeled adaptation data per task")
        check_task_sets(cfg, "data.adapt", list(data.adapt), exact=True)
    elif data.adapt:
        check_task_sets(cfg, "data.adapt", list(data.adapt), exact=False)
    if data.eval:
        check_task_sets(cfg, "data.eval", list(data.eval), exact=False)
        if model.family == "state_dict":
            raise fail(cfg, "data.eval", "family 'state_dict' has no forward pass to evaluate")
    for split in ("adapt", "eval"):
        for task, value in getattr(data, split).items():
            check_data_path(cfg, f"data.{split}.{task}", cfg.path(value), labeled=(split == "eval"))
    # device and output
    check_device(cfg)
    check_output(cfg, cfg.overwrite)


def check_converted_input(cfg: MergeConfig) -> bool:
    """A `symerge convert` output as input: family clip with `pretrained` = the converted dir and each expert its
    `<Task>` folder (its heads are used: no class names or templates needed). Other families pointed at one are
    told how to use it (a converted dir or task folder; naming single .safetensors files in it stays allowed for
    `state_dict`, which then merges the encoders only). Returns whether the input is a converted dir."""
    from symerge.models.convert import converted_task, read_convert_manifest

    model = cfg.model
    sources = [("model.pretrained", model.pretrained)] + [(f"model.experts.{t}", p) for t, p in model.experts.items()]
    root = cfg.path(model.pretrained)
    manifest = read_convert_manifest(root) if root.is_dir() else None
    if model.family != "clip" or manifest is None:
        for field_name, value in sources:
            path = cfg.path(value)
            for folder in ((path, path.parent) if path.is_dir() else ()):
                if (folder / "convert.json").is_file():
                    raise fail(cfg, field_name, f"'{path}' is (in) a `symerge convert` output; merge it with family: "
                               f"clip, pretrained: {folder} and experts {{<Task>: {folder}/<Task>}} (see README)")
        return False
    if model.templates is not None:
        raise fail(cfg, "model.templates", f"'{root}' is a `symerge convert` output: its converted heads are used, "
                   "so templates do not apply")
    complete = sorted(t for t in manifest.get("experts", {}) if t in manifest.get("heads", {}))
    for task, value in model.experts.items():
        if converted_task(root, manifest, cfg.path(value)) is None:
            raise fail(cfg, f"model.experts.{task}", f"'{cfg.path(value)}' is not a converted task of '{root}' (one "
                       f"with a finetuned model and a head: {[str(root / t) for t in complete]})")
    return True


def check_data_path(cfg: MergeConfig, field: str, path: Path, labeled: bool) -> None:
    if not path.exists():
        raise fail(cfg, field, f"'{path}' does not exist")
    if cfg.model.family == "hf_text":
        if not path.is_file():
            raise fail(cfg, field, f"'{path}' is not a file (text data: CSV, TSV or JSONL)")
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise fail(cfg, field, f"'{path.name}': unknown text data format '{path.suffix}'; use {list(TEXT_SUFFIXES)}")
        if labeled and path.suffix.lower() == ".txt":
            raise fail(cfg, field, f"'{path.name}': a .txt file holds texts without labels; labeled data must be "
                       "CSV, TSV or JSONL with a label column")
    elif cfg.model.family == "clip":
        if not path.is_dir():
            raise fail(cfg, field, f"'{path}' is not a folder (image data: a folder of images"
                       + (", one subfolder per class name)" if labeled else ")"))


def check_device(cfg: MergeConfig) -> None:
    problem = device_problem(cfg.device)
    if problem is not None:
        raise fail(cfg, "device", problem)
    trainer = cfg.method.trainer
    if trainer is not None and cfg.adaptive:
        problem = check_precision(trainer.precision, cfg.device)
        if problem is not None:
            raise fail(cfg, "method.trainer.precision", problem)


def local_inputs(cfg: MergeConfig) -> list[Path]:
    sources = [cfg.model.pretrained, *cfg.model.experts.values(), *cfg.data.adapt.values(), *cfg.data.eval.values()]
    return [cfg.path(s).resolve() for s in sources if cfg.path(s).exists()]


def check_output(cfg: MergeConfig, overwrite: bool) -> None:
    """The shared output-dir rule (`symerge.atomic.check_output_dir`: replace only an empty dir or a previous output,
    writable parent), plus: the output must not overlap an input."""
    from symerge.atomic import check_output_dir
    from symerge.export import METADATA_FILE

    out = cfg.output_path
    try:
        check_output_dir(out, overwrite, (METADATA_FILE,), hint="pass --overwrite (or set overwrite: true)",
                         label="")
    except ValidationError as err:
        raise fail(cfg, "output_dir", str(err)) from None
    resolved = out.resolve()
    for source in local_inputs(cfg):
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise fail(cfg, "output_dir", f"'{out}' overlaps the input '{source}'; write the result elsewhere")
