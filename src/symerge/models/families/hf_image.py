"""Family `hf_image`: Hugging Face `*ForImageClassification` experts (ViT, DeiT, BEiT, DINOv2, ConvNeXt, ResNet,
RegNet, Swin, EfficientNet, MobileNetV2, MobileViT) with image-folder data, preprocessed by the pretrained model's
image processor; exports a `save_pretrained` base model (+ processor), heads with their classifier configs, and
optionally standalone `AutoModelForImageClassification` dirs per task.

As in `hf_text`, the shared encoder is the classifier's base model (found through `base_model_prefix`) and the head
is every other module of the classifier. What the head reads is taken from the architecture (`ARCHITECTURES`, from
each class's `forward`), never from key names, so `head(encoder(pixel_values))` equals the classifier's logits:

    first_token  last_hidden_state[:, 0] (after the base model's final layernorm)      ViT, DeiT
    cls_mean     cat(last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(1))       DINOv2
    pooled       pooler_output, flattened to [B, C] (ResNet / RegNet pool to [B, C, 1, 1]; their classifier's
                 own Flatten is then a no-op)                                          the rest
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from symerge.batching import Inputs
from symerge.errors import FieldError, ValidationError, subject
from symerge.models.families.base import ExportInfo, Family, LoadedModel, ModelSection, error_field, register_family
from symerge.models.families.hf_text import hf_task_model, write_head_config, write_hf_task_models
from symerge.models.families.image_folder import check_image_folder, image_files, read_image_folder
from symerge.models.hf_text import SequenceClassificationHead as ImageClassificationHead  # modules run in order
from symerge.models.hf_text import SequenceEncoder
from symerge.pool import ModelPool
from symerge.tensorio import load_tensors
from symerge.validation import check_task_names


@dataclass(frozen=True)
class ImageHeadSpec:
    """`feature`: what the encoder returns (see the module docstring); `steps`: the head's modules, in order."""

    feature: Literal["first_token", "cls_mean", "pooled"]
    steps: tuple[str, ...] = ("classifier",)


_POOLED, _FIRST = ImageHeadSpec("pooled"), ImageHeadSpec("first_token")
_DROPOUT_POOLED = ImageHeadSpec("pooled", ("dropout", "classifier"))
ARCHITECTURES: dict[str, ImageHeadSpec] = {
    "ViTForImageClassification": _FIRST,
    "DeiTForImageClassification": _FIRST,
    "BeitForImageClassification": _POOLED,
    "Data2VecVisionForImageClassification": _POOLED,
    "Dinov2ForImageClassification": ImageHeadSpec("cls_mean"),
    "ConvNextForImageClassification": _POOLED,
    "ConvNextV2ForImageClassification": _POOLED,
    "ResNetForImageClassification": _POOLED,  # classifier = Sequential(Flatten, Linear)
    "RegNetForImageClassification": _POOLED,
    "SwinForImageClassification": _POOLED,
    "Swinv2ForImageClassification": _POOLED,
    "EfficientNetForImageClassification": _DROPOUT_POOLED,
    "MobileNetV2ForImageClassification": _DROPOUT_POOLED,
    "MobileViTForImageClassification": _DROPOUT_POOLED,
}


def head_spec(architecture: str) -> ImageHeadSpec:
    if architecture not in ARCHITECTURES:
        raise ValidationError(f"architecture '{architecture}' is not supported for image classifiers; supported: "
                              f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


def architecture_class(architecture: str) -> type:
    from symerge.models.hf_text import transformers_class

    head_spec(architecture)
    return transformers_class(architecture)


# --- encoder / head split --------------------------------------------------------------------------------------------
class _StatsWithGrad:
    """Batch norm whose running statistics may carry a gradient: the adaptive methods merge them with λ like any
    floating tensor (ResNet, RegNet, EfficientNet, ...), and `torch.batch_norm` refuses stats that require grad. In
    eval mode it then normalises with plain ops (same maths); otherwise (and at inference) it is the stock module."""

    def forward(self, x: Tensor) -> Tensor:
        mean, var = self.running_mean, self.running_var
        if self.training or mean is None or not (mean.requires_grad or var.requires_grad):
            return super().forward(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class _BatchNorm1d(_StatsWithGrad, nn.BatchNorm1d):
    pass


class _BatchNorm2d(_StatsWithGrad, nn.BatchNorm2d):
    pass


class _BatchNorm3d(_StatsWithGrad, nn.BatchNorm3d):
    pass


STATS_WITH_GRAD = {nn.BatchNorm1d: _BatchNorm1d, nn.BatchNorm2d: _BatchNorm2d, nn.BatchNorm3d: _BatchNorm3d}


class ImageEncoder(SequenceEncoder):
    """A classifier's base model returning exactly what its head reads ([B, C]); as `hf_text`'s encoder, the base
    model's children are this module's own, so `state_dict()` keys are the base model's and functional parameter
    substitution reaches them."""

    def __init__(self, base_model: nn.Module, feature: str):
        super().__init__(base_model, "pooled")  # registers the base model's children (checked: no tensors of its own)
        for module in base_model.modules():  # same tensors and state-dict keys; see _StatsWithGrad
            module.__class__ = STATS_WITH_GRAD.get(type(module), type(module))
        self.feature = feature

    def forward(self, pixel_values: Tensor) -> Tensor:  # type: ignore[override]
        dtype = next(self.parameters()).dtype  # the weights in use (substituted ones under functional_call)
        out = self.base_model(pixel_values=pixel_values.to(dtype), return_dict=True)
        if self.feature == "pooled":
            if getattr(out, "pooler_output", None) is None:
                raise ValidationError(f"{type(self.base_model).__name__} has no pooler output")
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        if self.feature == "cls_mean":
            return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)
        return hidden[:, 0]


def split_classifier(model: nn.Module) -> tuple[ImageEncoder, ImageClassificationHead]:
    """(encoder, head) of a supported `*ForImageClassification` model; the modules are shared, not copied."""
    architecture = type(model).__name__
    spec = head_spec(architecture)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):
        raise ValidationError(f"{architecture}: no base model under base_model_prefix '{prefix}'")
    rest = {name: child for name, child in model.named_children() if child is not base}
    if set(rest) != set(spec.steps):
        raise ValidationError(f"{architecture}: head modules {sorted(rest)} differ from the expected {list(spec.steps)}"
                              " (unsupported variant of this architecture)")
    if model._parameters or [k for k in model._buffers if k not in model._non_persistent_buffers_set]:
        raise ValidationError(f"{architecture}: holds tensors outside its base model and head modules")
    return ImageEncoder(base, spec.feature), ImageClassificationHead(rest, spec.steps)


# --- loading ---------------------------------------------------------------------------------------------------------
def load_classifier(source: str, owner: str, cls: type | None = None, config: Any = None, base_only: bool = False,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a supported image classifier; refuse missing, unexpected or mis-shaped tensors. `base_only` (a base model
    or another task's checkpoint): the head may be missing, and an unused base-model pooler (ViT) is ignored."""
    from transformers import AutoModelForImageClassification

    from symerge.models.hf_text import quiet_transformers, shape_mismatch_error

    loader = cls if cls is not None else AutoModelForImageClassification
    kwargs: dict[str, Any] = {"config": config} if config is not None else {}
    kwargs["dtype"] = dtype if dtype is not None else "auto"
    try:
        with quiet_transformers():
            model, info = loader.from_pretrained(source, output_loading_info=True, **kwargs)
    except Exception as err:  # noqa: BLE001
        if "ignore_mismatched_sizes" in str(err):
            raise shape_mismatch_error(loader, source, owner, kwargs) from None
        raise ValidationError(f"{owner}: cannot load '{source}': {type(err).__name__}: {err}") from None
    spec = head_spec(type(model).__name__)
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    if base_only:
        prefix = model.base_model_prefix + "."
        missing = [k for k in missing if not k.startswith(tuple(f"{m}." for m in spec.steps))]
        no_pooler = getattr(model.base_model, "pooler", None) is None
        unexpected = [k for k in unexpected if not (no_pooler and k.removeprefix(prefix).startswith("pooler."))]
    for keys, why in ((missing, "lacks tensor"), (unexpected, "holds unexpected tensor")):
        if keys:
            raise ValidationError(
                f"{owner}: '{source}' {why} '{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
                + f" for {type(model).__name__}; " + ("it would be randomly initialised" if keys is missing else
                                                       "transformers would silently drop it"))
    return model.eval()


def load_processor(sources: list[str]) -> Any:
    """The image processor saved with the first of `sources` that has one (PIL backend: no torchvision), or None."""
    from transformers import AutoImageProcessor

    from symerge.models.hf_text import quiet_transformers

    for source in sources:
        if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
            continue
        try:
            with quiet_transformers():
                try:
                    return AutoImageProcessor.from_pretrained(source, backend="pil")
                except TypeError:  # older transformers: no `backend`
                    return AutoImageProcessor.from_pretrained(source)
        except Exception:  # noqa: BLE001 - no usable processor here: try the next source
            continue
    return None


@dataclass
class ImageClassifierPool:
    """Pretrained base model (as encoder), per-task heads, the validated `ModelPool`, configs and image processor."""

    architecture: str
    encoder: ImageEncoder
    heads: dict[str, ImageClassificationHead]
    pool: ModelPool
    configs: dict[str, Any]
    processor: Any = None
    sources: dict[str, Any] = field(default_factory=dict)


def load_image_classifier_pool(pretrained: str, experts: Mapping[str, str], dtype: torch.dtype | None = None,
                               progress: bool = False) -> ImageClassifierPool:
    """Pool of K `AutoModelForImageClassification` experts fine-tuned from `pretrained` (a base model or a
    classifier of the same architecture); experts may have different `num_labels`. Everything is validated first."""
    from tqdm.auto import tqdm

    from symerge.models.hf_text import read_config, resolve_source

    tasks = check_task_names(experts.keys())
    with subject("pretrained"):
        pre_source = resolve_source(pretrained, "pretrained")
    sources = {}
    for task in tasks:
        with subject("expert", task):
            sources[task] = resolve_source(experts[task], f"expert '{task}'")
    models: dict[str, nn.Module] = {}
    for task in tqdm(tasks, desc="load experts", unit="model", disable=None if progress else True):
        owner = f"expert '{task}'"
        with subject("expert", task):
            declared = list(getattr(read_config(sources[task], owner), "architectures", None) or [])
            if declared and not declared[0].endswith("ForImageClassification"):
                raise ValidationError(f"{owner}: '{sources[task]}' holds a {declared[0]}, not an image classifier "
                                      f"(supported: {sorted(ARCHITECTURES)})")
            if declared:
                head_spec(declared[0])  # raises, naming the architecture
            models[task] = load_classifier(sources[task], owner, dtype=dtype)
    first = tasks[0]
    architecture = type(models[first]).__name__
    for task in tasks[1:]:
        if type(models[task]).__name__ != architecture:
            with subject("expert", task):
                raise ValidationError(f"expert '{task}' is a {type(models[task]).__name__}, but expert '{first}' is a "
                                      f"{architecture}: experts must share one architecture")
    with subject("pretrained"):
        pre_config = read_config(pre_source, "pretrained")
        if pre_config.model_type != models[first].config.model_type:
            raise ValidationError(f"pretrained '{pre_source}' is a '{pre_config.model_type}' model, but the experts "
                                  f"are '{models[first].config.model_type}' ({architecture})")
        encoder, _ = split_classifier(load_classifier(pre_source, "pretrained", cls=type(models[first]),
                                                      config=pre_config, base_only=True, dtype=dtype))
    heads, expert_encoders = {}, {}
    for task in tasks:
        enc, head = split_classifier(models[task])
        expert_encoders[task] = {k: v.detach() for k, v in enc.state_dict().items()}
        heads[task] = head.eval()
    configs = {t: models[t].config for t in tasks}
    pool = ModelPool.from_parts(encoder.state_dict(), expert_encoders, heads,
                                num_classes={t: int(configs[t].num_labels) for t in tasks})
    return ImageClassifierPool(architecture, encoder.eval(), heads, pool, configs,
                               load_processor([pre_source] + [sources[t] for t in tasks]),
                               {"pretrained": pre_source, "experts": dict(sources)})


# --- rebuilding ------------------------------------------------------------------------------------------------------
def new_classifier(architecture: str, config: Any) -> nn.Module:
    from symerge.models.hf_text import quiet_transformers

    with torch.random.fork_rng(devices=[]), quiet_transformers():
        return architecture_class(architecture)(copy.deepcopy(config))


def build_classifier(architecture: str, config: Any, encoder_state: Mapping[str, Tensor],
                     head_weights: Mapping[str, Tensor]) -> nn.Module:
    """A full `*ForImageClassification` model carrying the given base-model and head weights (strict)."""
    from symerge.models.hf_text import _load_strict

    model = new_classifier(architecture, config)
    encoder, head = split_classifier(model)
    with torch.no_grad():
        _load_strict(encoder, encoder_state, "encoder")
        _load_strict(head, head_weights, "head")
    return model.eval()


# --- the family ------------------------------------------------------------------------------------------------------
class HfImageModel(ModelSection):
    family: Literal["hf_image"]


@register_family
class HfImage(Family):
    name = "hf_image"
    section = HfImageModel
    task_models: ClassVar[bool] = True

    def check_data_path(self, path: Path, labeled: bool) -> str | None:
        return check_image_folder(path, labeled)

    def load(self, cfg: Any, progress: bool = False) -> LoadedModel:
        experts = {t: cfg.model_source(p) for t, p in cfg.model.experts.items()}
        try:
            ip = load_image_classifier_pool(cfg.model_source(cfg.model.pretrained), experts,
                                            dtype=cfg.model.torch_dtype, progress=progress)
        except ValidationError as err:
            raise FieldError(error_field(err), err) from None
        from symerge.models.hf_text import class_names_from_config

        names = {t: class_names_from_config(c) for t, c in ip.configs.items()}
        widths = {t: int(c.num_labels) for t, c in ip.configs.items()}
        for task, given in (cfg.model.class_names or {}).items():
            if len(given) != widths[task]:
                raise FieldError(f"model.class_names.{task}", f"{len(given)} class names, but expert '{task}' has "
                                 f"{widths[task]} labels")
            names[task] = list(given)
        return LoadedModel(self.name, ip.encoder, dict(ip.heads), ip.pool, names, widths, state=ip)

    def read_inputs(self, cfg: Any, loaded: LoadedModel, split: str, task: str,
                    class_names: list[str] | None) -> tuple[Inputs, list[int] | None]:
        if loaded.state.processor is None:
            raise FieldError("model.pretrained", f"no image processor (preprocessor_config.json) in the pretrained or "
                             f"expert directories {loaded.state.sources}; save one there with save_pretrained")
        folder = cfg.path(getattr(cfg.data, split)[task])
        pixels, labels = read_image_folder(folder, task, loaded.state.processor, class_names, f"data.{split}.{task}")
        return pixels, labels  # float32: the encoder casts them to its weights' dtype

    def count_inputs(self, cfg: Any, path: Path, field_name: str) -> int:
        return len(image_files(path))

    def export_info(self, loaded: LoadedModel, cfg: Any) -> ExportInfo:
        from symerge.models.hf_text import task_config

        info = super().export_info(loaded, cfg)
        info.architecture = loaded.state.architecture
        info.task_configs = {t: task_config(loaded.state.configs[t], loaded.class_names.get(t)) for t in loaded.tasks}
        info.processor = loaded.state.processor
        return info

    def save_processor(self, directory: Path, info: ExportInfo) -> None:
        if info.processor is not None:
            info.processor.save_pretrained(directory)

    def write_encoder(self, result: Any, root: Path, info: ExportInfo) -> dict[str, Any]:
        from symerge.models.hf_text import _load_strict, quiet_transformers

        base = copy.deepcopy(result.encoder.base_model)  # a copy: the result's encoder is not modified
        with torch.no_grad():
            _load_strict(ImageEncoder(base, result.encoder.feature), result.encoder_state, "encoder")
        with quiet_transformers():
            base.save_pretrained(root / "encoder")
        self.save_processor(root / "encoder", info)
        return {"format": "hf", "path": "encoder"}

    def write_head(self, task: str, head: nn.Module, root: Path, info: ExportInfo) -> None:
        super().write_head(task, head, root, info)
        write_head_config(task, root, info)

    def write_task_models(self, result: Any, root: Path, info: ExportInfo) -> tuple[dict[str, str], str | None]:
        return write_hf_task_models(result, root, info, build_classifier, self.save_processor)

    def load_result(self, root: Path, meta: Mapping[str, Any]) -> tuple[nn.Module, dict[str, nn.Module], Any]:
        from symerge.models.hf_text import _load_strict, config_from_json, read_config

        architecture = meta["architecture"]
        directory = str(root / meta["encoder"]["path"])
        encoder, _ = split_classifier(load_classifier(directory, "merged encoder", cls=architecture_class(architecture),
                                                      config=read_config(directory, "merged encoder"), base_only=True))
        heads: dict[str, nn.Module] = {}
        for task in meta["tasks"]:
            config = config_from_json((root / "heads" / f"{task}.config.json").read_text(), encoder.config)
            head = split_classifier(new_classifier(architecture, config))[1]
            with torch.no_grad():
                _load_strict(head, load_tensors(root / meta["tasks"][task]["head"], f"head of task '{task}'"),
                             f"head of task '{task}'")
            heads[task] = head.eval()
        return encoder.eval(), heads, None

    def task_model(self, root: Path, meta: Mapping[str, Any], task: str, verify: bool, load: Any) -> nn.Module:
        return hf_task_model(root, meta, task, verify, load, load_classifier, build_classifier)
