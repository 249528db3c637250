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

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symerge.atomic import atomic_directory, prepare_output_dir, share_modes
from symerge.errors import SymergeError, ValidationError
from symerge.result import MergeResult

FORMAT = "symerge-merge"
FORMAT_VERSION = 1
METADATA_FILE = "symerge.json"


@dataclass
class ExportInfo:
    """What a family needs besides the `MergeResult` to write (and later rebuild) its models."""

    family: str  # hf_text | clip | state_dict
    num_labels: dict[str, int] = field(default_factory=dict)
    class_names: dict[str, list[str]] = field(default_factory=dict)
    architecture: str | None = None  # hf_text: the *ForSequenceClassification class
    task_configs: dict[str, Any] = field(default_factory=dict)  # hf_text: each task's classifier config
    tokenizer: Any = None  # saved next to HF models
    task_models: bool | None = None  # hf_text: write tasks/<task>/ (None: only for tasks with their own encoder)
    processor: Any = None  # clip image processor
    normalize: bool = True  # clip: L2-normalised embeddings


# --- helpers ---------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def save_tensors(state: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)
    share_modes(Path(path))  # safetensors writes 0600; give the file the modes of a plain write


def load_tensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValidationError(f"{what}: '{path}' is missing")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own type for corrupt files
        raise ValidationError(f"{what}: '{path}' is not a valid safetensors file (corrupt or truncated): {err}") from None


class TensorStore(nn.Module):
    """Tensors under their dotted names, without an architecture (state_dict family): weights only, no forward."""

    def __init__(self, state: Mapping[str, Tensor]):
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module: nn.Module = self
            for part in path:
                child = module._modules.get(part)
                if child is None:
                    if hasattr(module, part):
                        raise ValidationError(f"tensor name '{key}' clashes with another tensor's name")
                    child = nn.Module()
                    module.add_module(part, child)
                module = child
            if leaf in module._modules:
                raise ValidationError(f"tensor name '{key}' clashes with another tensor's name")
            if value.is_floating_point():
                module.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))
            else:
                module.register_buffer(leaf, value.detach().clone())

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise SymergeError("this model has no architecture (state_dict family): load its weights into your own model")


# --- writing ---------------------------------------------------------------------------------------------------------
def head_state(head: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in head.state_dict().items()}


def write_result(
    result: MergeResult,
    output_dir: str | Path,
    info: ExportInfo,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `result` (see the module docstring for the layout); refuse an existing `output_dir` unless `overwrite`."""
    out = Path(output_dir)
    prepare_output_dir(out, overwrite, (METADATA_FILE,))
    with atomic_directory(out, replace=overwrite, manifests=(METADATA_FILE,)) as tmp:
        files = write_files(result, tmp, info, dict(metadata or {}))
        meta = json.loads((tmp / METADATA_FILE).read_text())
        meta["outputs"] = {name: sha256_file(tmp / name) for name in files}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def standalone_tasks(result: MergeResult, info: ExportInfo) -> list[str]:
    """The tasks that get a standalone transformers classifier in tasks/<task>/ (hf_text only).

    Each is a full encoder copy, so by default (`task_models=None`) only tasks whose encoder differs from the
    shared one (per-task overrides: EMR, SyMerge block mode) get one: for them encoder/ + heads/ is not the task's
    model. Otherwise the shared encoder/ plus the small heads/ are the whole result (`task_model` rebuilds a
    transformers classifier from them on demand). `task_models=True` writes every task, `False` none."""
    if info.family != "hf_text" or info.task_models is False:
        return []
    if info.task_models:
        return list(result.tasks)
    return [t for t in result.tasks if result.task_overrides.get(t)]


def write_files(result: MergeResult, root: Path, info: ExportInfo, metadata: dict[str, Any]) -> list[str]:
    tasks = list(result.tasks)
    # encoder
    if info.family == "hf_text":
        from symerge.models.hf_text import save_encoder

        save_encoder(result.encoder, result.encoder_state, root / "encoder")
        if info.tokenizer is not None:
            info.tokenizer.save_pretrained(root / "encoder")
        encoder_entry = {"format": "hf", "path": "encoder"}
    elif info.family == "clip":
        model = result.encoder.to_hf(result.encoder_state)  # CLIPVisionEncoder -> CLIPVisionModelWithProjection
        model.save_pretrained(root / "encoder")
        if info.processor is not None:
            info.processor.save_pretrained(root / "encoder")
        encoder_entry = {"format": "hf", "path": "encoder", "normalize": info.normalize}
    elif info.family == "state_dict":
        save_tensors(result.encoder_state, root / "encoder.safetensors")
        encoder_entry = {"format": "safetensors", "path": "encoder.safetensors"}
    else:
        raise ValidationError(f"unknown model family '{info.family}'")
    # heads, overrides, adapters
    (root / "heads").mkdir()
    for task in tasks:
        head = result.heads[task]
        if info.family == "clip":
            from symerge.models.clip import save_head

            save_head(head, root / "heads" / f"{task}.safetensors")
        else:
            save_tensors(head_state(head), root / "heads" / f"{task}.safetensors")
        if info.family == "hf_text":
            from symerge.models.hf_text import config_to_json

            (root / "heads" / f"{task}.config.json").write_text(config_to_json(info.task_configs[task]) + "\n")
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
    # ready-to-use per-task classifiers
    task_dirs: dict[str, str | None] = {t: None for t in tasks}
    skipped = None
    wanted = standalone_tasks(result, info)
    if info.family == "hf_text" and result.adapters:
        skipped = f"'{result.method}' adds per-task adapters that have no transformers equivalent; use symerge.load"
    elif wanted:
        from symerge.models.hf_text import build_classifier, quiet_transformers

        for task in wanted:
            model = build_classifier(info.architecture, info.task_configs[task], result.encoder_params(task),
                                     head_state(result.heads[task]))
            with quiet_transformers():
                model.save_pretrained(root / "tasks" / task)
            if info.tokenizer is not None:
                info.tokenizer.save_pretrained(root / "tasks" / task)
            task_dirs[task] = f"tasks/{task}"
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
    family = meta["family"]
    tasks = list(meta["tasks"])
    if family == "hf_text":
        from symerge.models.hf_text import _load_strict, config_from_json, empty_head, load_encoder

        architecture = meta["architecture"]
        encoder = load_encoder(root / meta["encoder"]["path"], architecture)
        heads: dict[str, nn.Module] = {}
        for task in tasks:
            config = config_from_json((root / "heads" / f"{task}.config.json").read_text(), encoder.config)
            head = empty_head(architecture, config)
            with torch.no_grad():
                _load_strict(head, load_tensors(root / meta["tasks"][task]["head"], f"head of task '{task}'"), f"head of task '{task}'")
            heads[task] = head.eval()
    elif family == "clip":
        from transformers import CLIPVisionModelWithProjection

        from symerge.models.clip import CLIPVisionEncoder, load_head
        from symerge.models.hf_text import quiet_transformers

        with quiet_transformers():
            model = CLIPVisionModelWithProjection.from_pretrained(str(root / meta["encoder"]["path"]))
        encoder = CLIPVisionEncoder.from_hf(model.eval(), bool(meta["encoder"].get("normalize", True)))
        heads = {t: load_head(root / meta["tasks"][t]["head"]).eval() for t in tasks}
    elif family == "state_dict":
        encoder = TensorStore(load_tensors(root / meta["encoder"]["path"], "merged encoder"))
        heads = {t: TensorStore(load_tensors(root / meta["tasks"][t]["head"], f"head of task '{t}'")) for t in tasks}
    else:
        raise ValidationError(f"'{root}': unknown model family '{family}'")
    encoder_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    overrides = {t: load_tensors(root / e["encoder_override"], f"encoder override of task '{t}'")
                 for t, e in meta["tasks"].items() if e.get("encoder_override")}
    adapters = {t: load_adapter(root / e["adapter"], t) for t, e in meta["tasks"].items() if e.get("adapter")}
    lambdas, rows = None, []
    if meta.get("lambdas"):
        lambdas = load_tensors(root / meta["lambdas"]["file"], "λ")["lambdas"]
        rows = list(json.loads((root / meta["lambdas"]["names"]).read_text())["rows"])
    tokenizer = None
    if family == "hf_text":  # saved beside the encoder: predict(task, ["raw text"]) tokenises as the run did
        from symerge.models.hf_text import load_tokenizer

        tokenizer = load_tokenizer([str(root / meta["encoder"]["path"])])
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
    if meta["family"] != "hf_text":
        raise ValidationError(f"'{root}': task models exist for family 'hf_text' only, not '{meta['family']}'")
    if task not in meta["tasks"]:
        raise ValidationError(f"unknown task '{task}'; '{root}' has {list(meta['tasks'])}")
    if meta["tasks"][task].get("adapter"):
        raise ValidationError(f"task '{task}' of '{root}' has a Surgery adapter, which has no transformers form; "
                              "use symerge.load")
    from symerge.models.hf_text import build_classifier, config_from_json, load_classifier

    if meta["tasks"][task].get("transformers_dir"):
        if verify:
            verify_outputs(root, meta, under=meta["tasks"][task]["transformers_dir"])
        return load_classifier(str(root / meta["tasks"][task]["transformers_dir"]), f"task '{task}'").eval()
    result = load(root, verify=verify)
    config = config_from_json((root / "heads" / f"{task}.config.json").read_text(), result.encoder.config)
    return build_classifier(meta["architecture"], config, result.encoder_params(task), head_state(result.heads[task]))


def load_adapter(path: Path, task: str) -> nn.Module:
    from symerge.adaptive.surgery import SurgeryAdapter

    state = load_tensors(path, f"adapter of task '{task}'")
    if set(state) != {"down.weight", "up.weight"}:
        raise ValidationError(f"adapter of task '{task}': unexpected tensors {sorted(state)}")
    rank, dim = state["down.weight"].shape
    adapter = SurgeryAdapter(int(dim), int(rank)).to(state["down.weight"].dtype)
    adapter.load_state_dict(state)
    return adapter.eval()
