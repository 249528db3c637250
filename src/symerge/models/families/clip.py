"""Family `clip`: CLIP vision towers with zero-shot heads (FusionBench layout), or a `symerge convert` output
(task_vectors / open_clip) with its converted heads (`symerge.models.clip`); image-folder data; exports a
`CLIPVisionModelWithProjection` dir and `ClassificationHead` files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import importlib.util

from pydantic import Field, field_validator
from torch import nn

from symerge.batching import Inputs
from symerge.errors import FieldError, ValidationError
from symerge.models.families.base import ExportInfo, Family, LoadedModel, ModelSection, error_field, register_family
from symerge.models.families.image_folder import check_image_folder, image_files, read_image_folder
from symerge.pool import ModelPool


class ClipModel(ModelSection):
    field_hints: ClassVar[dict[str, str]] = {
        "templates": "prompt templates are for family 'clip', not '{family}'",
        "normalize": "normalize (L2-normalised image embeddings before the head) is for family 'clip', not '{family}'",
    }

    family: Literal["clip"]
    templates: list[str] | None = Field(default=None, description="clip: prompt templates with '{}'")
    normalize: bool = Field(default=True, description="clip: L2-normalise image embeddings before the head")

    @field_validator("dtype")
    @classmethod
    def _float32_only(cls, dtype: str) -> str:
        if dtype not in ("auto", "float32"):
            raise FieldError("model.dtype", f"family 'clip' is always loaded in float32 (got '{dtype}')")
        return dtype

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, templates: list[str] | None) -> list[str] | None:
        if templates is not None:
            if not templates:
                raise FieldError("model.templates", "empty list")
            for i, template in enumerate(templates):
                if "{}" not in template:
                    raise FieldError(f"model.templates.{i}", f"template {template!r} has no '{{}}' for the class name")
        return templates


def clip_image_processor(source: str, image_size: int | None = None) -> Any:
    """The CLIP image processor of the pretrained dir (PIL + numpy backend: no torchvision), else CLIP defaults
    at the model's image size (`image_size`, or read from the dir's config)."""
    import transformers

    from symerge.models.hf_text import quiet_transformers, read_config

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    try:
        with quiet_transformers():
            return cls.from_pretrained(source)
    except Exception:  # noqa: BLE001 - no preprocessor_config.json: fall back to the model's image size
        if image_size is None:
            config = read_config(source, "pretrained")
        size = image_size or int(getattr(getattr(config, "vision_config", config), "image_size"))
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@register_family
class Clip(Family):
    name = "clip"
    section = ClipModel
    reads_converted: ClassVar[bool] = True

    def check_inputs(self, cfg: Any, converted: bool) -> None:
        if converted and cfg.model.templates is not None:
            raise FieldError("model.templates", f"'{cfg.path(cfg.model.pretrained)}' is a `symerge convert` output: "
                             "its converted heads are used, so templates do not apply")

    def class_names_required(self, converted: bool) -> bool:
        return not converted  # zero-shot heads are built from them

    def check_data_path(self, path: Path, labeled: bool) -> str | None:
        return check_image_folder(path, labeled)

    def load(self, cfg: Any, progress: bool = False) -> LoadedModel:
        if importlib.util.find_spec("symerge.models.clip") is None:
            raise FieldError("model.family", "'clip' needs symerge.models.clip, which this installation lacks")
        from symerge.models.clip import DEFAULT_TEMPLATES, load_clip_pool
        from symerge.models.convert import read_convert_manifest

        pretrained = cfg.model_source(cfg.model.pretrained)
        try:
            if Path(pretrained).is_dir() and read_convert_manifest(Path(pretrained)) is not None:
                return self.load_converted(cfg, Path(pretrained))
            experts = {t: cfg.model_source(p) for t, p in cfg.model.experts.items()}
            names = {t: list(v) for t, v in (cfg.model.class_names or {}).items()}
            templates = list(cfg.model.templates) if cfg.model.templates else list(DEFAULT_TEMPLATES)
            encoder, heads, pool = load_clip_pool(pretrained, experts, names, templates, normalize=cfg.model.normalize,
                                                  device=cfg.device)
        except ValidationError as err:
            raise FieldError(error_field(err), err) from None
        return LoadedModel(self.name, encoder, dict(heads), pool, names, {t: len(n) for t, n in names.items()},
                           state=clip_image_processor(pretrained))

    def load_converted(self, cfg: Any, root: Path) -> LoadedModel:
        """A `symerge convert` output (task_vectors layout) as a clip pool: its converted heads are the task heads,
        so class names are optional (needed only to read labeled eval data)."""
        from symerge.models.clip import load_converted_pool
        from symerge.models.convert import converted_task, read_convert_manifest

        manifest = read_convert_manifest(root) or {}
        source = {t: converted_task(root, manifest, cfg.path(p)) for t, p in cfg.model.experts.items()}
        encoder, heads, pool = load_converted_pool(root, tasks=list(source.values()), normalize=cfg.model.normalize)
        if any(t != s for t, s in source.items()):  # the config names the tasks differently from the converted dirs
            heads = {t: heads[s] for t, s in source.items()}
            pool = ModelPool.from_parts(encoder.state_dict(), {t: pool.experts[s] for t, s in source.items()}, heads)
        widths = {t: int(h.weight.shape[0]) for t, h in heads.items()}
        names = {t: list(v) for t, v in (cfg.model.class_names or {}).items()}
        for task, given in names.items():
            if len(given) != widths[task]:
                raise FieldError(f"model.class_names.{task}", f"{len(given)} class names, but the converted head "
                                 f"'{root / manifest['heads'][source[task]]}' has {widths[task]} classes")
        info = manifest["files"][manifest["pretrained"]].get("hf_vision_config") or {}
        return LoadedModel(self.name, encoder, dict(heads), pool, names, widths,
                           state=clip_image_processor(str(root), int(info.get("image_size", 224))))

    def read_inputs(self, cfg: Any, loaded: LoadedModel, split: str, task: str,
                    class_names: list[str] | None) -> tuple[Inputs, list[int] | None]:
        folder = cfg.path(getattr(cfg.data, split)[task])
        return read_image_folder(folder, task, loaded.state, class_names, f"data.{split}.{task}")

    def count_inputs(self, cfg: Any, path: Path, field_name: str) -> int:
        return len(image_files(path))

    def export_info(self, loaded: LoadedModel, cfg: Any) -> ExportInfo:
        info = super().export_info(loaded, cfg)
        info.processor, info.normalize = loaded.state, cfg.model.normalize
        return info

    def write_encoder(self, result: Any, root: Path, info: ExportInfo) -> dict[str, Any]:
        model = result.encoder.to_hf(result.encoder_state)  # CLIPVisionEncoder -> CLIPVisionModelWithProjection
        model.save_pretrained(root / "encoder")
        if info.processor is not None:
            info.processor.save_pretrained(root / "encoder")
        return {"format": "hf", "path": "encoder", "normalize": info.normalize}

    def write_head(self, task: str, head: nn.Module, root: Path, info: ExportInfo) -> None:
        from symerge.models.clip import save_head

        save_head(head, root / "heads" / f"{task}.safetensors")

    def load_result(self, root: Path, meta: Mapping[str, Any]) -> tuple[nn.Module, dict[str, nn.Module], Any]:
        from transformers import CLIPVisionModelWithProjection

        from symerge.models.clip import CLIPVisionEncoder, load_head
        from symerge.models.hf_text import quiet_transformers

        with quiet_transformers():
            model = CLIPVisionModelWithProjection.from_pretrained(str(root / meta["encoder"]["path"]))
        encoder = CLIPVisionEncoder.from_hf(model.eval(), bool(meta["encoder"].get("normalize", True)))
        heads = {t: load_head(root / meta["tasks"][t]["head"]).eval() for t in meta["tasks"]}
        return encoder, heads, None
