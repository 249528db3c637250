"""Family `hf_text`: Hugging Face `*ForSequenceClassification` experts (`symerge.models.hf_text`) with text data
(CSV / TSV / JSONL / JSON; .txt = one unlabeled text per line); exports a `save_pretrained` base model, heads with
their classifier configs, and optionally standalone `AutoModelForSequenceClassification` dirs per task."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn

from symerge.batching import Inputs
from symerge.errors import FieldError, ValidationError
from symerge.models.families.base import (ExportInfo, Family, LoadedModel, ModelSection, error_field, register_family,
                                          standalone_tasks)
from symerge.tensorio import head_state, load_tensors

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt")  # .txt: one unlabeled text per line (adaptation only)


class HfTextModel(ModelSection):
    family: Literal["hf_text"]


# --- data ------------------------------------------------------------------------------------------------------------
def read_rows(path: Path, field_name: str, cfg: Any) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise FieldError(field_name, f"'{path}' is not UTF-8 text ({err})") from None
    if suffix in (".csv", ".tsv"):
        try:
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as err:
            raise FieldError(field_name, f"'{path}' is not valid CSV: {err}") from None
        return rows
    if suffix == ".txt":
        return [{cfg.data.text_column: line} for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FieldError(field_name, f"'{path}' is not valid JSON: {err}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FieldError(field_name, f"'{path}': a .json data file must be a list of objects")
        return data
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FieldError(field_name, f"'{path}' line {number} is not valid JSON: {err}") from None
        if not isinstance(row, dict):
            raise FieldError(field_name, f"'{path}' line {number} is not a JSON object")
        rows.append(row)
    return rows


def parse_label(value: Any, names: list[str], where: str, field_name: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value.strip())
    else:
        raise FieldError(field_name, f"{where}: label {value!r} is neither a class name {names} nor an index")
    if not 0 <= index < len(names):
        raise FieldError(field_name, f"{where}: label {index} is out of range for {len(names)} classes")
    return index


def read_text_data(cfg: Any, split: str, task: str, class_names: list[str] | None) -> tuple[list[str], list[int] | None]:
    field_name = f"data.{split}.{task}"
    path = cfg.path(getattr(cfg.data, split)[task])
    rows = read_rows(path, field_name, cfg)
    if not rows:
        raise FieldError(field_name, f"'{path}' has no rows")
    text_column, label_column = cfg.data.text_column, cfg.data.label_column
    columns = [text_column] + ([label_column] if class_names is not None else [])
    for column in columns:
        if column not in rows[0]:
            raise FieldError(field_name, f"'{path}' has no column '{column}' (columns: {sorted(rows[0])}); "
                             "set data.text_column / data.label_column")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text = row.get(text_column)
        if not isinstance(text, str):
            raise FieldError(field_name, f"'{path}' row {number}: '{text_column}' is {text!r}, not text")
        texts.append(text)
        if class_names is not None:
            labels.append(parse_label(row.get(label_column), class_names, f"'{path}' row {number}", field_name))
    if not any(t.strip() for t in texts):
        raise FieldError(field_name, f"'{path}': every '{text_column}' value is empty ({len(texts)} rows); nothing to "
                         f"{'evaluate' if class_names is not None else 'adapt'} on")
    return texts, labels if class_names is not None else None


# --- the family ------------------------------------------------------------------------------------------------------
@register_family
class HfText(Family):
    name = "hf_text"
    section = HfTextModel
    regime: ClassVar[str] = "nlp"
    task_models: ClassVar[bool] = True
    holds_experts: ClassVar[bool] = False  # local safetensors experts stay on disk (`load_text_classifier_pool(lazy=)`)

    def check_data_path(self, path: Path, labeled: bool) -> str | None:
        if not path.is_file():
            return f"'{path}' is not a file (text data: CSV, TSV or JSONL)"
        if path.suffix.lower() not in TEXT_SUFFIXES:
            return f"'{path.name}': unknown text data format '{path.suffix}'; use {list(TEXT_SUFFIXES)}"
        if labeled and path.suffix.lower() == ".txt":
            return (f"'{path.name}': a .txt file holds texts without labels; labeled data must be CSV, TSV or JSONL "
                    "with a label column")
        return None

    def load(self, cfg: Any, progress: bool = False) -> LoadedModel:
        from symerge.models.hf_text import load_text_classifier_pool

        experts = {t: cfg.model_source(p) for t, p in cfg.model.experts.items()}
        try:
            tp = load_text_classifier_pool(cfg.model_source(cfg.model.pretrained), experts,
                                           dtype=cfg.model.torch_dtype, progress=progress, lazy=True)
        except ValidationError as err:
            raise FieldError(error_field(err), err) from None
        names = tp.class_names
        for task, given in (cfg.model.class_names or {}).items():
            width = tp.num_labels[task]
            if len(given) != width:
                last = [k for k, v in tp.heads[task].state_dict().items() if v.dim() >= 1][-1]
                raise FieldError(f"model.class_names.{task}", f"{len(given)} class names, but expert '{task}' has "
                                 f"{width} labels (head tensor '{last}' has output width {width})")
            names[task] = list(given)
        return LoadedModel(self.name, tp.encoder, dict(tp.heads), tp.pool, names, tp.num_labels, state=tp)

    def read_inputs(self, cfg: Any, loaded: LoadedModel, split: str, task: str,
                    class_names: list[str] | None) -> tuple[Inputs, list[int] | None]:
        texts, labels = read_text_data(cfg, split, task, class_names)
        return loaded.state.tokenize(texts, cfg.data.max_len), labels

    def count_inputs(self, cfg: Any, path: Path, field_name: str) -> int:
        return len(read_rows(path, field_name, cfg))

    def finish_result(self, result: Any, loaded: LoadedModel, cfg: Any) -> None:
        # predict(task, ["raw text"]) works on the returned result as on a loaded one
        result.tokenizer, result.max_len = loaded.state.tokenizer, cfg.data.max_len

    def export_info(self, loaded: LoadedModel, cfg: Any) -> ExportInfo:
        from symerge.models.hf_text import task_config

        info = super().export_info(loaded, cfg)
        info.architecture = loaded.state.architecture
        info.task_configs = {t: task_config(loaded.state.configs[t], loaded.class_names.get(t)) for t in loaded.tasks}
        info.tokenizer = loaded.state.tokenizer
        return info

    def write_encoder(self, result: Any, root: Path, info: ExportInfo) -> dict[str, Any]:
        from symerge.models.hf_text import save_encoder

        save_encoder(result.encoder, result.encoder_state, root / "encoder")
        if info.tokenizer is not None:
            info.tokenizer.save_pretrained(root / "encoder")
        return {"format": "hf", "path": "encoder"}

    def write_head(self, task: str, head: nn.Module, root: Path, info: ExportInfo) -> None:
        super().write_head(task, head, root, info)
        write_head_config(task, root, info)

    def write_task_models(self, result: Any, root: Path, info: ExportInfo) -> tuple[dict[str, str], str | None]:
        from symerge.models.hf_text import build_classifier

        return write_hf_task_models(result, root, info, build_classifier, self.save_preprocessor)

    def save_preprocessor(self, directory: Path, info: ExportInfo) -> None:
        if info.tokenizer is not None:
            info.tokenizer.save_pretrained(directory)

    def load_result(self, root: Path, meta: Mapping[str, Any]) -> tuple[nn.Module, dict[str, nn.Module], Any]:
        import torch

        from symerge.models.hf_text import _load_strict, config_from_json, empty_head, load_encoder, load_tokenizer

        architecture = meta["architecture"]
        encoder = load_encoder(root / meta["encoder"]["path"], architecture)
        heads: dict[str, nn.Module] = {}
        for task in meta["tasks"]:
            config = config_from_json((root / "heads" / f"{task}.config.json").read_text(), encoder.config)
            head = empty_head(architecture, config)
            with torch.no_grad():
                _load_strict(head, load_tensors(root / meta["tasks"][task]["head"], f"head of task '{task}'"),
                             f"head of task '{task}'")
            heads[task] = head.eval()
        # saved beside the encoder: predict(task, ["raw text"]) tokenises as the run did
        tokenizer = load_tokenizer([str(root / meta["encoder"]["path"])])
        return encoder, heads, tokenizer

    def task_model(self, root: Path, meta: Mapping[str, Any], task: str, verify: bool, load: Any) -> nn.Module:
        from symerge.models.hf_text import build_classifier, load_classifier

        return hf_task_model(root, meta, task, verify, load, load_classifier, build_classifier)


# --- export shared by the Hugging Face families (hf_text, hf_image) ---------------------------------------------------
def write_head_config(task: str, root: Path, info: ExportInfo) -> None:
    """The task's classifier config beside its head, so the head can be rebuilt without the expert."""
    from symerge.models.hf_text import config_to_json

    (root / "heads" / f"{task}.config.json").write_text(config_to_json(info.task_configs[task]) + "\n")


def write_hf_task_models(result: Any, root: Path, info: ExportInfo, build: Any,
                         save_preprocessor: Any) -> tuple[dict[str, str], str | None]:
    """`tasks/<task>/`: a standalone transformers classifier (built by `build`) plus its preprocessor per task."""
    if result.adapters:
        return {}, f"'{result.method}' adds per-task adapters that have no transformers equivalent; use symerge.load"
    from symerge.models.hf_text import quiet_transformers

    dirs = {}
    for task in standalone_tasks(result, info):
        model = build(info.architecture, info.task_configs[task], result.encoder_params(task),
                      head_state(result.heads[task]))
        with quiet_transformers():
            model.save_pretrained(root / "tasks" / task)
        save_preprocessor(root / "tasks" / task, info)
        dirs[task] = f"tasks/{task}"
    return dirs, None


def hf_task_model(root: Path, meta: Mapping[str, Any], task: str, verify: bool, load: Any, load_dir: Any,
                  build: Any) -> nn.Module:
    """A task's transformers classifier: its `tasks/<task>/` dir if written, else rebuilt from the shared encoder and
    the task's head + head config."""
    from symerge.models.hf_text import config_from_json

    if meta["tasks"][task].get("transformers_dir"):
        return load_dir(str(root / meta["tasks"][task]["transformers_dir"]), f"task '{task}'").eval()
    result = load(root, verify=verify)
    config = config_from_json((root / "heads" / f"{task}.config.json").read_text(), result.encoder.config)
    return build(meta["architecture"], config, result.encoder_params(task), head_state(result.heads[task]))
