"""The `symerge merge CONFIG.yaml` config: one validated file naming models, method, data and output.

    model:
      family: hf_text                 # a registered family: hf_text | clip | state_dict | ...
      pretrained: bert-base-uncased   # dir (relative to this file) or hub id
      experts: {sst2: ckpt/sst2, trec: ckpt/trec}
    method: {name: symerge, options: {task_layer: head}, trainer: {steps: 200, batch_size: 16}}
    data: {adapt: {sst2: data/sst2.csv, trec: data/trec.jsonl}}
    output_dir: out/merged

Every error names the field (dotted path, e.g. `method.options.densty`) and why; task names must agree between
`model.experts`, `model.class_names` and `data.*`. Relative paths are relative to the config file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from symerge.adaptive.config import TrainerConfig
from symerge.adaptive.registry import adaptive_methods, get_adaptive, is_adaptive
from symerge.devices import check_precision, device_problem
from symerge.errors import FieldError, ValidationError
from symerge.models.families import family_names, forward_families, get_family, model_section_type, task_model_families
from symerge.models.families.base import TASK_NAME  # noqa: F401 - re-exported
from symerge.models.families.hf_text import TEXT_SUFFIXES  # noqa: F401 - re-exported
from symerge.models.families.image_folder import IMAGE_SUFFIXES  # noqa: F401 - re-exported

FAMILIES = tuple(family_names())


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The `model:` section: one class per family, declared next to its plugin (symerge.models.families), as a union
# discriminated by `family` — pydantic checks each family's own fields and rules.
ModelSection = model_section_type()


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
        return is_adaptive(self.method.name)

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
        regime = get_family(self.model.family).regime
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
        loc, msg = tuple(item["loc"]), item["msg"]
        if loc[:1] == ("model",) and len(loc) > 1 and loc[1] in FAMILIES:
            loc = loc[:1] + loc[2:]  # the discriminated union's member tag: not a config field
        if item["type"] == "union_tag_invalid" and loc == ("model",):
            loc, value = ("model", "family"), (item.get("ctx") or {}).get("tag", value)
            names = [repr(f) for f in FAMILIES]
            msg = "Input should be " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])
        elif item["type"] == "union_tag_not_found" and loc == ("model",):
            loc, msg, item = ("model", "family"), "Field required", {**item, "type": "missing"}
        shown = "" if item["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {dotted(loc)}: {msg}{shown}")
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
    except FieldError as err:  # a family section's own rule (raised with its field, through pydantic)
        raise ValidationError(f"invalid config {source}: {err.field}: {err.why}") from None
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

    return available_methods(), adaptive_methods()


def check_method_options(cfg: MergeConfig) -> None:
    """Every option of the method — name, declared type, value — before anything is loaded; the options are kept
    coerced to their declared types (e.g. a YAML list to a tuple)."""
    from symerge.method_options import OptionError, check_adaptive_options, check_static_options

    method = cfg.method
    check = check_adaptive_options if is_adaptive(method.name) else check_static_options
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
    try:
        check_rules(cfg)
    except FieldError as err:  # a family's check, raised with its field
        raise fail(cfg, err.field, err.why) from None


def check_rules(cfg: MergeConfig) -> None:
    """The rules across sections (each section's own rules — task names, a family's fields — ran in pydantic)."""
    model, method, data = cfg.model, cfg.method, cfg.data
    family = get_family(model.family)
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
        if not getattr(get_adaptive(method.name).cls, "exportable", True):
            raise fail(cfg, "method.name", f"adaptive method '{method.name}' gives an encoder whose weights depend on "
                       "the input, which `symerge merge` cannot write; run it with symerge.adaptive.adapt (keep the "
                       "result with torch.save) or in the suites")
        if not family.has_forward:
            raise fail(cfg, "method.name", f"adaptive method '{method.name}' needs a model with a forward pass "
                       f"(family {' or '.join(forward_families())}); family '{model.family}' supports the static "
                       f"methods {static}")
    else:
        if method.trainer is not None:
            raise fail(cfg, "method.trainer", f"'{method.name}' is a static method; only adaptive methods {adaptive} "
                       "take a trainer block")
    # family-specific rules that need more than the model section (the section's own ran in pydantic)
    if cfg.export.task_models and not family.task_models:
        raise fail(cfg, "export.task_models", f"standalone per-task models are written for family "
                   f"{' or '.join(repr(f) for f in task_model_families())} only, not '{model.family}' (load the output "
                   "with symerge.load)")
    converted = check_converted_input(cfg)
    family.check_inputs(cfg, converted)
    names = model.class_names or {}
    check_task_sets(cfg, "model.class_names", list(names), exact=family.class_names_required(converted))
    # data
    if cfg.adaptive:
        if not data.adapt:
            raise fail(cfg, "data.adapt", f"adaptive method '{method.name}' needs unlabeled adaptation data per task")
        check_task_sets(cfg, "data.adapt", list(data.adapt), exact=True)
    elif data.adapt:
        check_task_sets(cfg, "data.adapt", list(data.adapt), exact=False)
    if data.eval:
        check_task_sets(cfg, "data.eval", list(data.eval), exact=False)
        if not family.has_forward:
            raise fail(cfg, "data.eval", f"family '{model.family}' has no forward pass to evaluate")
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
    if not get_family(model.family).reads_converted or manifest is None:
        for field_name, value in sources:
            path = cfg.path(value)
            for folder in ((path, path.parent) if path.is_dir() else ()):
                if (folder / "convert.json").is_file():
                    raise fail(cfg, field_name, f"'{path}' is (in) a `symerge convert` output; merge it with family: "
                               f"clip, pretrained: {folder} and experts {{<Task>: {folder}/<Task>}} (see README)")
        return False
    complete = sorted(t for t in manifest.get("experts", {}) if t in manifest.get("heads", {}))
    for task, value in model.experts.items():
        if converted_task(root, manifest, cfg.path(value)) is None:
            raise fail(cfg, f"model.experts.{task}", f"'{cfg.path(value)}' is not a converted task of '{root}' (one "
                       f"with a finetuned model and a head: {[str(root / t) for t in complete]})")
    return True


def check_data_path(cfg: MergeConfig, field: str, path: Path, labeled: bool) -> None:
    if not path.exists():
        raise fail(cfg, field, f"'{path}' does not exist")
    why = get_family(cfg.model.family).check_data_path(path, labeled)
    if why is not None:
        raise fail(cfg, field, why)


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
