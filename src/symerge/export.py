"""Write a merge result to a directory, and `load` it back.

Layout (written to a temp dir beside the target, then renamed: the output appears complete or not at all):

    symerge.json                  method, options, seed, sha256 of inputs and outputs, metrics, per-task labels
    encoder/                      merged encoder, `save_pretrained` format (hf_text: the base model; clip:
                                  CLIPVisionModelWithProjection) — or encoder.safetensors (state_dict family)
    heads/<task>.safetensors      each task's head / task-specific layer (+ <task>.config.json for hf_text)
    overrides/<task>.safetensors  per-task encoder tensors (SyMerge block mode, EMR), when the method has them
    adapters/<task>.safetensors   Representation Surgery adapters, when the method has them
    lambdas.safetensors, lambdas.json   λ [rows, tasks] and the row / task names, for methods that learn λ
    tasks/<task>/                 hf_text: a ready AutoModelForSequenceClassification dir (encoder + head + config,
                                  tokenizer), with the task's own encoder weights when it has overrides

`load(dir)` rebuilds the `MergeResult`; `transformers.AutoModelForSequenceClassification.from_pretrained(
dir / "tasks" / task)` gives the same logits (not written for Surgery: its adapters have no transformers form).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symerge.atomic import atomic_directory, prepare_output_dir
from symerge.errors import ValidationError
from symerge.hashing import sha256_file  # noqa: F401 - re-exported
from symerge.models.families import ExportInfo, get_family
from symerge.models.families.base import standalone_tasks  # noqa: F401 - re-exported
from symerge.result import MergeResult
from symerge.tensorio import TensorStore, head_state, load_tensors, save_tensors  # noqa: F401 - re-exported

FORMAT = "symerge-merge"
FORMAT_VERSION = 1
METADATA_FILE = "symerge.json"


# --- helpers ---------------------------------------------------------------------------------------------------------
def sha256_tree(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (relative names, sorted)."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def jsonable(value: Any) -> Any:
    """Options / provenance as JSON (tensors become lists, non-finite floats strings, paths strings)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


# --- writing ---------------------------------------------------------------------------------------------------------
def write_result(
    result: MergeResult,
    output_dir: str | Path,
    info: ExportInfo,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `result` (see the module docstring for the layout); refuse an existing `output_dir` unless `overwrite`."""
    if getattr(result.encoder, "input_dependent_weights", False):
        raise ValidationError(f"a '{result.method}' result cannot be exported: its encoder mixes its weights per "
                              "input, so there is no single encoder to write; keep it with torch.save(result, path) "
                              "and torch.load(path, weights_only=False)")
    out = Path(output_dir)
    prepare_output_dir(out, overwrite, (METADATA_FILE,))
    with atomic_directory(out, replace=overwrite, manifests=(METADATA_FILE,)) as tmp:
        files = write_files(result, tmp, info, dict(metadata or {}))
        meta = json.loads((tmp / METADATA_FILE).read_text())
        meta["outputs"] = {name: sha256_file(tmp / name) for name in files}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def write_files(result: MergeResult, root: Path, info: ExportInfo, metadata: dict[str, Any]) -> list[str]:
    tasks = list(result.tasks)
    family = get_family(info.family)
    # encoder and heads: in the family's format
    encoder_entry = family.write_encoder(result, root, info)
    (root / "heads").mkdir()
    for task in tasks:
        family.write_head(task, result.heads[task], root, info)
    # overrides, adapters
    if result.task_overrides:
        (root / "overrides").mkdir()
        for task, state in result.task_overrides.items():
            save_tensors(state, root / "overrides" / f"{task}.safetensors")
    if result.adapters:
        (root / "adapters").mkdir()
        for task, adapter in result.adapters.items():
            save_tensors(head_state(adapter), root / "adapters" / f"{task}.safetensors")
    # λ
    lambdas_entry = None
    if result.lambdas is not None:
        save_tensors({"lambdas": result.lambdas.float()}, root / "lambdas.safetensors")
        (root / "lambdas.json").write_text(json.dumps({"rows": list(result.lambda_rows), "tasks": tasks}, indent=2) + "\n")
        lambdas_entry = {"file": "lambdas.safetensors", "names": "lambdas.json", "shape": list(result.lambdas.shape)}
    # ready-to-use per-task models (families that have them)
    written, skipped = family.write_task_models(result, root, info)
    task_dirs: dict[str, str | None] = {t: written.get(t) for t in tasks}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": info.family,
        "architecture": info.architecture,
        "method": result.method,
        "tasks": {
            t: {
                "num_labels": info.num_labels.get(t),
                "class_names": info.class_names.get(t),
                "head": f"heads/{t}.safetensors",
                "encoder_override": f"overrides/{t}.safetensors" if t in result.task_overrides else None,
                "adapter": f"adapters/{t}.safetensors" if t in result.adapters else None,
                "transformers_dir": task_dirs[t],
            }
            for t in tasks
        },
        "transformers_dirs_skipped": skipped,
        "export": {"task_models": any(task_dirs.values())},
        "encoder": encoder_entry,
        "lambdas": lambdas_entry,
        **jsonable(metadata),
        "provenance": jsonable(result.provenance),
        "loss_history": jsonable(result.loss_history),
    }
    (root / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != METADATA_FILE)


# --- loading ---------------------------------------------------------------------------------------------------------
def read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise ValidationError(f"'{directory}' is not a directory" if directory.exists() else f"'{directory}' does not exist")
    if not path.is_file():
        raise ValidationError(f"'{directory}' is not a symerge output (no {METADATA_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValidationError(f"'{path}' is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValidationError(f"'{path}' is not a symerge merge output (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValidationError(f"'{path}' has format version {meta['format_version']}; this symerge reads ≤ {FORMAT_VERSION}")
    return meta


def verify_outputs(root: Path, meta: Mapping[str, Any], under: str | None = None) -> None:
    """Check every file `load` reads against the sha256 that symerge.json recorded, so a swapped or damaged head,
    encoder or λ file fails loudly instead of loading silently (tasks/ is not read by `load`, so not hashed).
    `under`: check only the files of that folder instead (a tasks/<task> dir that `task_model` reads)."""
    for name, digest in (meta.get("outputs") or {}).items():
        if (name.startswith("tasks/") if under is None else not name.startswith(f"{under}/")):
            continue
        path = root / name
        if not path.is_file():
            raise ValidationError(f"'{root}': '{name}' is missing (symerge.json records it); pass verify=False to "
                                  "load what is there")
        if sha256_file(path) != digest:
            raise ValidationError(f"'{root}': '{name}' does not match the sha256 recorded in {METADATA_FILE} (the file "
                                  "was changed or swapped after the merge); pass verify=False to load it anyway")


def load(directory: str | Path, verify: bool = True) -> MergeResult:
    """Rebuild the `MergeResult` written by `write_result` (`symerge merge`); predictions are reproduced exactly.

    `verify` (default) checks each file against the sha256 recorded in symerge.json first; `verify=False` skips
    that (faster for big encoders, and loads files that were edited on purpose)."""
    root = Path(directory)
    meta = read_metadata(root)
    if verify:
        verify_outputs(root, meta)
    tasks = list(meta["tasks"])
    try:
        family = get_family(meta["family"])
    except ValidationError:
        raise ValidationError(f"'{root}': unknown model family '{meta['family']}'") from None
    encoder, heads, tokenizer = family.load_result(root, meta)
    encoder_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    overrides = {t: load_tensors(root / e["encoder_override"], f"encoder override of task '{t}'")
                 for t, e in meta["tasks"].items() if e.get("encoder_override")}
    adapters = {t: load_adapter(root / e["adapter"], t) for t, e in meta["tasks"].items() if e.get("adapter")}
    lambdas, rows = None, []
    if meta.get("lambdas"):
        lambdas = load_tensors(root / meta["lambdas"]["file"], "λ")["lambdas"]
        rows = list(json.loads((root / meta["lambdas"]["names"]).read_text())["rows"])
    max_len = int(((meta.get("config") or {}).get("data") or {}).get("max_len") or 128)
    return MergeResult(
        method=meta["method"], tasks=tasks, encoder=encoder, encoder_state=encoder_state, heads=heads,
        task_overrides=overrides, adapters=adapters, lambdas=lambdas, lambda_rows=rows,
        loss_history=list(meta.get("loss_history") or []), provenance=dict(meta.get("provenance") or {}),
        tokenizer=tokenizer, max_len=max_len,
    )


def task_model(directory: str | Path, task: str, verify: bool = True) -> nn.Module:
    """A plain transformers `*ForSequenceClassification` for `task` of an hf_text output, in either layout: the
    standalone tasks/<task>/ when it was written, else rebuilt from encoder/ (+ the task's overrides) and its head."""
    root = Path(directory)
    meta = read_metadata(root)
    family = get_family(meta["family"])
    if not family.task_models:
        return family.task_model(root, meta, task, verify, load)  # raises: this family has no task models
    if task not in meta["tasks"]:
        raise ValidationError(f"unknown task '{task}'; '{root}' has {list(meta['tasks'])}")
    if meta["tasks"][task].get("adapter"):
        raise ValidationError(f"task '{task}' of '{root}' has a Surgery adapter, which has no transformers form; "
                              "use symerge.load")
    if meta["tasks"][task].get("transformers_dir") and verify:
        verify_outputs(root, meta, under=meta["tasks"][task]["transformers_dir"])
    return family.task_model(root, meta, task, verify, load)


def load_adapter(path: Path, task: str) -> nn.Module:
    from symerge.adaptive.surgery import SurgeryAdapter

    state = load_tensors(path, f"adapter of task '{task}'")
    if set(state) != {"down.weight", "up.weight"}:
        raise ValidationError(f"adapter of task '{task}': unexpected tensors {sorted(state)}")
    rank, dim = state["down.weight"].shape
    adapter = SurgeryAdapter(int(dim), int(rank)).to(state["down.weight"].dtype)
    adapter.load_state_dict(state)
    return adapter.eval()
