"""`symerge merge CONFIG.yaml` end to end: validate, load, merge (static or adaptive), evaluate, export.

Everything that can fail on the inputs (config, checkpoints, data) is checked before the output is written; the
output directory is written atomically, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.distributed import is_main_process
from symerge.atomic import clean_stale_temp_dirs
from symerge.batching import Inputs
from symerge.config import IMAGE_SUFFIXES, MergeConfig, check_output, load_config, parse_config
from symerge.errors import SymergeError, ValidationError
from symerge.export import ExportInfo, TensorStore, jsonable, sha256_file, sha256_tree, write_result
from symerge.pool import ModelPool
from symerge.result import MergeResult


@dataclass
class LoadedModel:
    family: str
    encoder: nn.Module
    heads: dict[str, nn.Module]
    pool: ModelPool
    class_names: dict[str, list[str]] = field(default_factory=dict)
    num_labels: dict[str, int] = field(default_factory=dict)
    text: Any = None  # TextClassifierPool (hf_text)
    processor: Any = None  # CLIP image processor (clip)

    @property
    def tasks(self) -> list[str]:
        return list(self.pool.tasks)


def config_error(cfg: MergeConfig, field_name: str, why: Any) -> ValidationError:
    return ValidationError(f"{cfg.source}: {field_name}: {why}")


# --- models ----------------------------------------------------------------------------------------------------------
def model_field(cfg: MergeConfig, message: str) -> str:
    """The config field a loader's message is about ("expert 'a': ..." -> model.experts.a)."""
    match = re.match(r"(?:expert|head of task|task) '([^']+)'", message)
    if match and match.group(1) in cfg.model.experts:
        section = "class_names" if re.search(r"class(es| names?) (are )?(declared|given)", message) else "experts"
        return f"model.{section}.{match.group(1)}"
    if message.startswith("pretrained"):
        return "model.pretrained"
    return "model"


def load_model(cfg: MergeConfig, progress: bool = False) -> LoadedModel:
    loaders = {"hf_text": load_hf_text, "clip": load_clip, "state_dict": load_state_dicts}
    try:
        if cfg.model.family == "hf_text":
            return load_hf_text(cfg, progress)
        return loaders[cfg.model.family](cfg)
    except ValidationError as err:
        if str(err).startswith(cfg.source):
            raise
        raise config_error(cfg, model_field(cfg, str(err)), err) from None


def load_hf_text(cfg: MergeConfig, progress: bool = False) -> LoadedModel:
    from symerge.models.hf_text import load_text_classifier_pool

    experts = {t: cfg.model_source(p) for t, p in cfg.model.experts.items()}
    tp = load_text_classifier_pool(cfg.model_source(cfg.model.pretrained), experts, dtype=cfg.model.torch_dtype,
                                   progress=progress)
    names = tp.class_names
    for task, given in (cfg.model.class_names or {}).items():
        width = tp.num_labels[task]
        if len(given) != width:
            last = [k for k, v in tp.heads[task].state_dict().items() if v.dim() >= 1][-1]
            raise config_error(cfg, f"model.class_names.{task}", f"{len(given)} class names, but expert '{task}' has "
                               f"{width} labels (head tensor '{last}' has output width {width})")
        names[task] = list(given)
    return LoadedModel("hf_text", tp.encoder, dict(tp.heads), tp.pool, names, tp.num_labels, text=tp)


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


def load_clip(cfg: MergeConfig) -> LoadedModel:
    import importlib.util

    if importlib.util.find_spec("symerge.models.clip") is None:
        raise config_error(cfg, "model.family", "'clip' needs symerge.models.clip, which this installation lacks")
    from symerge.models.clip import DEFAULT_TEMPLATES, load_clip_pool
    from symerge.models.convert import read_convert_manifest

    pretrained = cfg.model_source(cfg.model.pretrained)
    if Path(pretrained).is_dir() and read_convert_manifest(Path(pretrained)) is not None:
        return load_converted_clip(cfg, Path(pretrained))
    experts = {t: cfg.model_source(p) for t, p in cfg.model.experts.items()}
    names = {t: list(v) for t, v in (cfg.model.class_names or {}).items()}
    templates = list(cfg.model.templates) if cfg.model.templates else list(DEFAULT_TEMPLATES)
    encoder, heads, pool = load_clip_pool(pretrained, experts, names, templates, normalize=cfg.model.normalize,
                                          device=cfg.device)
    return LoadedModel("clip", encoder, dict(heads), pool, names, {t: len(n) for t, n in names.items()},
                       processor=clip_image_processor(pretrained))


def load_converted_clip(cfg: MergeConfig, root: Path) -> LoadedModel:
    """A `symerge convert` output (task_vectors layout) as a clip pool: its converted heads are the task heads, so
    class names are optional (needed only to read labeled eval data)."""
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
            raise config_error(cfg, f"model.class_names.{task}", f"{len(given)} class names, but the converted head "
                               f"'{root / manifest['heads'][source[task]]}' has {widths[task]} classes")
    info = manifest["files"][manifest["pretrained"]].get("hf_vision_config") or {}
    return LoadedModel("clip", encoder, dict(heads), pool, names, widths,
                       processor=clip_image_processor(str(root), int(info.get("image_size", 224))))


def read_safetensors(path: Path, owner: str) -> dict[str, Tensor]:
    """A .safetensors file, or every .safetensors file of a directory (sharded checkpoints)."""
    from safetensors.torch import load_file

    from symerge.models.hf_text import check_safetensors_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValidationError(f"{owner}: '{path}' holds no .safetensors file")
    elif path.suffix != ".safetensors":
        raise ValidationError(f"{owner}: '{path}' is not a .safetensors file (pickled checkpoints are never loaded: "
                              "convert them with `symerge convert`)")
    else:
        files = [path]
    state: dict[str, Tensor] = {}
    for file in files:
        check_safetensors_file(file, owner)
        try:
            part = load_file(str(file))
        except Exception as err:  # noqa: BLE001
            raise ValidationError(f"{owner}: '{file}' is not a valid safetensors file (corrupt or truncated): {err}") from None
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValidationError(f"{owner}: tensor '{clash[0]}' appears in two files of '{path}'")
        state.update(part)
    return state


def cast_floats(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating tensors cast to `dtype` (model.dtype; None: as stored); integer buffers untouched."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_state_dicts(cfg: MergeConfig) -> LoadedModel:
    dtype = cfg.model.torch_dtype
    pre = cast_floats(read_safetensors(cfg.path(cfg.model.pretrained), "pretrained"), dtype)
    experts = {t: cast_floats(read_safetensors(cfg.path(p), f"expert '{t}'"), dtype) for t, p in cfg.model.experts.items()}
    names = {t: list(v) for t, v in (cfg.model.class_names or {}).items()}
    prefixes = list(cfg.model.head_prefixes or [])
    pool = ModelPool.from_models(pre, experts, head_prefixes=prefixes, num_classes={t: len(n) for t, n in names.items()})
    heads = {t: TensorStore(pool.heads.get(t, {})) for t in pool.tasks}
    widths = {t: int(list(h.values())[-1].shape[0]) for t, h in pool.heads.items() if h}
    return LoadedModel("state_dict", TensorStore(pool.pretrained), heads, pool, names, widths)


# --- data ------------------------------------------------------------------------------------------------------------
def read_rows(path: Path, field_name: str, cfg: MergeConfig) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise config_error(cfg, field_name, f"'{path}' is not UTF-8 text ({err})") from None
    if suffix in (".csv", ".tsv"):
        try:
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as err:
            raise config_error(cfg, field_name, f"'{path}' is not valid CSV: {err}") from None
        return rows
    if suffix == ".txt":
        return [{cfg.data.text_column: line} for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise config_error(cfg, field_name, f"'{path}' is not valid JSON: {err}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise config_error(cfg, field_name, f"'{path}': a .json data file must be a list of objects")
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise config_error(cfg, field_name, f"'{path}' line {number} is not valid JSON: {err}") from None
        if not isinstance(row, dict):
            raise config_error(cfg, field_name, f"'{path}' line {number} is not a JSON object")
        rows.append(row)
    return rows


def parse_label(value: Any, names: list[str], where: str, cfg: MergeConfig, field_name: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value.strip())
    else:
        raise config_error(cfg, field_name, f"{where}: label {value!r} is neither a class name {names} nor an index")
    if not 0 <= index < len(names):
        raise config_error(cfg, field_name, f"{where}: label {index} is out of range for {len(names)} classes")
    return index


def read_text_data(cfg: MergeConfig, split: str, task: str, class_names: list[str] | None) -> tuple[list[str], list[int] | None]:
    field_name = f"data.{split}.{task}"
    path = cfg.path(getattr(cfg.data, split)[task])
    rows = read_rows(path, field_name, cfg)
    if not rows:
        raise config_error(cfg, field_name, f"'{path}' has no rows")
    columns = [cfg.data.text_column] + ([cfg.data.label_column] if class_names is not None else [])
    for column in columns:
        if column not in rows[0]:
            raise config_error(cfg, field_name, f"'{path}' has no column '{column}' (columns: {sorted(rows[0])}); "
                               "set data.text_column / data.label_column")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text = row.get(cfg.data.text_column)
        if not isinstance(text, str):
            raise config_error(cfg, field_name, f"'{path}' row {number}: '{cfg.data.text_column}' is {text!r}, not text")
        texts.append(text)
        if class_names is not None:
            labels.append(parse_label(row.get(cfg.data.label_column), class_names, f"'{path}' row {number}", cfg, field_name))
    if not any(t.strip() for t in texts):
        raise config_error(cfg, field_name, f"'{path}': every '{cfg.data.text_column}' value is empty "
                           f"({len(texts)} rows); nothing to {'evaluate' if class_names is not None else 'adapt'} on")
    return texts, labels if class_names is not None else None


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_images(files: list[Path], processor: Any, cfg: MergeConfig, field_name: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    batches = []
    for start in range(0, len(files), 64):
        images = []
        for file in files[start:start + 64]:
            try:
                with Image.open(file) as img:
                    images.append(img.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise config_error(cfg, field_name, f"'{file}' is not a readable image ({err})") from None
        batches.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(batches)


def read_image_data(cfg: MergeConfig, split: str, task: str, processor: Any,
                    class_names: list[str] | None) -> tuple[Tensor, list[int] | None]:
    field_name = f"data.{split}.{task}"
    folder = cfg.path(getattr(cfg.data, split)[task])
    if class_names is None:
        files = image_files(folder)
        if not files:
            raise config_error(cfg, field_name, f"'{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return read_images(files, processor, cfg, field_name), None
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in subdirs if p.name not in class_names]
    if unknown:
        raise config_error(cfg, field_name, f"subfolder '{unknown[0]}' of '{folder}' is not a class name of task "
                           f"'{task}' ({class_names})")
    files, labels = [], []
    for sub in subdirs:
        found = image_files(sub)
        files += found
        labels += [class_names.index(sub.name)] * len(found)
    if not files:
        raise config_error(cfg, field_name, f"'{folder}' holds no images in per-class subfolders")
    return read_images(files, processor, cfg, field_name), labels


def task_inputs(cfg: MergeConfig, loaded: LoadedModel, split: str, task: str,
                labeled: bool) -> tuple[Inputs, Tensor | None]:
    names = loaded.class_names.get(task) if labeled else None
    if labeled and names is None:
        raise config_error(cfg, f"data.{split}.{task}", f"task '{task}' has no class names to read labels with")
    if loaded.family == "hf_text":
        texts, labels = read_text_data(cfg, split, task, names)
        inputs: Inputs = loaded.text.tokenize(texts, cfg.data.max_len)
    else:
        inputs, labels = read_image_data(cfg, split, task, loaded.processor, names)
    return inputs, (torch.tensor(labels, dtype=torch.long) if labels is not None else None)


# --- method ----------------------------------------------------------------------------------------------------------
def run_method(cfg: MergeConfig, loaded: LoadedModel, adapt_inputs: Mapping[str, Inputs], progress: bool) -> MergeResult:
    from symerge.merging import get_method, merge_delta
    from symerge.merging.registry import PerTaskDelta

    name, options = cfg.method.name, cfg.method_options()
    tv = loaded.pool.task_vectors(cfg.method.storage_dtype)
    torch.manual_seed(cfg.seed)
    try:
        if cfg.adaptive:
            from symerge.adaptive import adapt

            trainer = cfg.trainer_config()
            if not progress:
                trainer = trainer.model_copy(update={"progress": False})
            kinds = options.pop("task_kinds", None)
            return adapt(name, loaded.encoder, loaded.heads, tv, dict(adapt_inputs), config=trainer, task_kinds=kinds,
                         **options)
        resolved = get_method(name).resolve_options(options)
        delta = merge_delta(name, tv, **options)
    except SymergeError:
        raise
    except (TypeError, ValueError) as err:
        raise config_error(cfg, "method.options", f"method '{name}' failed with options {options}: {err}") from None
    provenance = {"method": name, "options": resolved, "seed": cfg.seed}
    if isinstance(delta, PerTaskDelta):
        overrides = {t: tv.apply(d) for t, d in delta.per_task.items()}
        return MergeResult(name, loaded.tasks, loaded.encoder, loaded.pool.pretrained, dict(loaded.heads),
                           task_overrides=overrides, provenance={**provenance, "per_task_encoder": True})
    return MergeResult(name, loaded.tasks, loaded.encoder, tv.apply(delta), dict(loaded.heads), provenance=provenance)


def evaluate(result: MergeResult, eval_data: Mapping[str, tuple[Inputs, Tensor]], cfg: MergeConfig,
             progress: bool = False) -> dict[str, Any] | None:
    from tqdm.auto import tqdm

    from symerge.evaluation.metrics import accuracy

    if not eval_data:
        return None
    scores = {}
    for task, (inputs, labels) in tqdm(eval_data.items(), desc="evaluate", unit="task",
                                       disable=None if progress else True):  # None: only on a terminal
        logits = result.predict(task, inputs, batch_size=cfg.data.batch_size, device=cfg.device)
        scores[task] = accuracy(logits, labels)
    return {"accuracy": scores, "average_accuracy": sum(scores.values()) / len(scores),
            "samples": {t: int(len(labels)) for t, (_, labels) in eval_data.items()}}


# --- provenance ------------------------------------------------------------------------------------------------------
def hash_source(cfg: MergeConfig, value: str) -> dict[str, Any]:
    source = cfg.model_source(value)
    path = Path(source)
    if path.exists():
        return {"path": str(path), "sha256": sha256_tree(path)}
    return {"hub_id": source}


def input_hashes(cfg: MergeConfig) -> dict[str, Any]:
    hashes: dict[str, Any] = {"model.pretrained": hash_source(cfg, cfg.model.pretrained)}
    for task, value in cfg.model.experts.items():
        hashes[f"model.experts.{task}"] = hash_source(cfg, value)
    for split in ("adapt", "eval"):
        for task, value in getattr(cfg.data, split).items():
            hashes[f"data.{split}.{task}"] = {"path": str(cfg.path(value)), "sha256": sha256_tree(cfg.path(value))}
    return hashes


# --- the whole run ---------------------------------------------------------------------------------------------------
def run_merge(config: str | Path | MergeConfig | Mapping[str, Any], overwrite: bool | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None) -> tuple[MergeResult, Path]:
    """Validate `config` (a YAML path, a mapping or a `MergeConfig`), merge, evaluate and export; returns the result
    and the output directory. `log` (e.g. `print`) receives each phase's duration and the metrics table."""
    config_file = None
    if isinstance(config, MergeConfig):
        cfg = config
        if overwrite:
            cfg.overwrite = True
        check_output(cfg, cfg.overwrite)
    elif isinstance(config, Mapping):
        data = dict(config)
        cfg = parse_config(data, overwrite=overwrite)
    else:
        config_file = Path(config)
        cfg = load_config(config_file, overwrite=overwrite)
    clean_stale_temp_dirs(cfg.output_path)  # a killed earlier run's temp dir, before this run needs the space
    start = time.perf_counter()
    phases = PhaseTimer(log)
    with phases("load"):
        loaded = load_model(cfg, progress)
        adapt_inputs = {t: task_inputs(cfg, loaded, "adapt", t, labeled=False)[0] for t in cfg.data.adapt} if cfg.adaptive else {}
        eval_data = {t: task_inputs(cfg, loaded, "eval", t, labeled=True) for t in cfg.data.eval}
        hashes = input_hashes(cfg)
        if config_file is not None:
            hashes["config"] = {"path": str(config_file), "sha256": sha256_file(config_file)}
    with phases("adapt" if cfg.adaptive else "merge"):
        result = run_method(cfg, loaded, adapt_inputs, progress)
    if loaded.text is not None:  # predict(task, ["raw text"]) works on the returned result as on a loaded one
        result.tokenizer, result.max_len = loaded.text.tokenizer, cfg.data.max_len
    if not is_main_process():  # under torchrun every rank holds the same result; rank 0 evaluates and writes
        return result, cfg.output_path
    with phases("evaluate"):
        metrics = evaluate(result, eval_data, cfg, progress)
    from symerge import __version__

    metadata = {
        "symerge_version": __version__,
        "options": result.provenance.get("options", cfg.method_options()),
        "trainer": cfg.trainer_config().model_dump(mode="json") if cfg.adaptive else None,
        "seed": cfg.seed,
        "device": cfg.device,
        "config": cfg.model_dump(mode="json"),
        "inputs": hashes,
        "metrics": metrics,
        "seconds": time.perf_counter() - start,
        "phase_seconds": dict(phases.seconds),
    }
    info = ExportInfo(
        family=loaded.family, num_labels=dict(loaded.num_labels), class_names=dict(loaded.class_names),
        architecture=loaded.text.architecture if loaded.text is not None else None,
        task_configs=task_configs(loaded), tokenizer=loaded.text.tokenizer if loaded.text is not None else None,
        processor=loaded.processor, normalize=cfg.model.normalize, task_models=cfg.export.task_models,
    )
    with phases("export"):
        out = write_result(result, cfg.output_path, info, jsonable(metadata), overwrite=cfg.overwrite)
    if log is not None and metrics is not None:
        log(metrics_table(metrics))
    return result, out


class PhaseTimer:
    """`with timer("load"): ...` records the phase's seconds and reports it through `log` as it ends."""

    def __init__(self, log: Callable[[str], None] | None):
        self.log = log
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - start
        if self.log is not None:
            self.log(f"{phase:<9} {self.seconds[phase]:7.1f} s")


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Per-task accuracy (Markdown), with the number of evaluation samples and the average."""
    rows = ["| task | accuracy | samples |", "|---|---:|---:|"]
    for task, value in metrics["accuracy"].items():
        rows.append(f"| {task} | {100 * value:.2f} | {metrics['samples'][task]} |")
    rows.append(f"| average | {100 * metrics['average_accuracy']:.2f} | |")
    return "\n".join(rows)


def task_configs(loaded: LoadedModel) -> dict[str, Any]:
    if loaded.text is None:
        return {}
    from symerge.models.hf_text import task_config

    return {t: task_config(loaded.text.configs[t], loaded.class_names.get(t)) for t in loaded.tasks}
