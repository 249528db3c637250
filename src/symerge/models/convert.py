"""`symerge convert SRC_DIR OUT_DIR`: task_vectors / open_clip pickles -> safetensors, without running pickled code.

Input (the task_vectors release layout, e.g. `checkpoints/ViT-B-32/`; whatever subset exists is converted):

    zeroshot.pt              pretrained ImageEncoder (whole pickled module)
    <Task>/finetuned.pt      expert ImageEncoder per task
    <Task>/zeroshot.pt       per-task copy of the pretrained model (kept if present)
    head_<Task>.pt           ClassificationHead per task (weight [C, D], bias, normalize)

Output: the same names with `.safetensors` (models keep their original tensor names, e.g. 'model.visual.conv1.weight';
heads hold 'weight' and 'bias' with metadata 'normalize'), and `convert.json`: sha256 of every input and output,
what was found, what was skipped, and per model the inferred Hugging Face `CLIPVisionConfig` (see
`symerge.models.clip.load_converted_pool`). Everything is written to a temp dir beside OUT_DIR and renamed at the
end: a refused (e.g. malicious) or corrupt pickle leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symerge.atomic import atomic_directory, prepare_output_dir
from symerge.errors import ValidationError
from symerge.hashing import sha256_file
from symerge.models.safe_pickle import InertObject, extract_state_dict, is_module, module_classes, safe_load

FORMAT = "symerge.convert/1"
MANIFEST = "convert.json"


def find_task_vectors_files(src_dir: str | os.PathLike) -> dict[str, Any]:
    """What the task_vectors layout under `src_dir` holds: pretrained, experts, task zeroshots, heads, ignored."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ValidationError(f"source '{src}' is not a directory")
    found: dict[str, Any] = {"pretrained": None, "experts": {}, "task_zeroshot": {}, "heads": {}, "ignored": []}
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        if entry.is_file():
            if name == "zeroshot.pt":
                found["pretrained"] = entry
            elif name.startswith("head_") and name.endswith(".pt") and len(name) > len("head_.pt"):
                found["heads"][name[len("head_"):-len(".pt")]] = entry
            else:
                found["ignored"].append(name)
        elif entry.is_dir():
            known = {"finetuned.pt": "experts", "zeroshot.pt": "task_zeroshot"}
            for file_name, table in known.items():
                if (entry / file_name).is_file():
                    found[table][name] = entry / file_name
            if not any((entry / f).is_file() for f in known):
                found["ignored"].append(f"{name}/")
            else:
                found["ignored"].extend(f"{name}/{p.name}" for p in sorted(entry.iterdir())
                                        if p.name not in known and not p.name.startswith("."))
    if found["pretrained"] is None and not found["experts"] and not found["task_zeroshot"] and not found["heads"]:
        raise ValidationError(f"no task_vectors checkpoints in '{src}': expected zeroshot.pt, <Task>/finetuned.pt, "
                              "<Task>/zeroshot.pt or head_<Task>.pt")
    return found


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, none sharing memory (safetensors refuses shared storages)."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        tensor = value.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _head_from_graph(graph: Any, owner: str) -> tuple[dict[str, Tensor], bool | None]:
    state = extract_state_dict(graph, owner)
    weight = state.get("weight")
    if weight is None or weight.dim() != 2:
        raise ValidationError(f"{owner}: not a classification head (no 2-D 'weight'; tensors: {sorted(state)[:5]})")
    bias = state.get("bias")
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValidationError(f"{owner}: 'bias' has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    normalize = graph.attributes().get("normalize") if isinstance(graph, InertObject) else None
    return {"weight": weight, "bias": bias}, (bool(normalize) if isinstance(normalize, bool) else None)


def _model_info(graph: Any, state: Mapping[str, Tensor]) -> dict[str, Any]:
    from symerge.models.clip import detect_hidden_act, openclip_to_hf_vision

    classes = module_classes(graph) if is_module(graph) else {}
    info: dict[str, Any] = {
        "root_class": classes.get("", type(graph).__name__),
        "tensors": len(state),
        "parameters": int(sum(t.numel() for t in state.values())),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in state.values()}),
    }
    act = detect_hidden_act(classes)
    info["hidden_act"] = act
    try:
        _, config = openclip_to_hf_vision(state, hidden_act=act or "quick_gelu")
        info["hf_vision_config"] = config
    except ValidationError as err:
        info["hf_vision_config"] = None
        info["hf_vision_note"] = str(err)
    return info


def _convert_into(found: Mapping[str, Any], src: Path, tmp: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    manifest: dict[str, Any] = {
        "format": FORMAT, "source": str(src.resolve()), "pretrained": None, "experts": {}, "task_zeroshot": {},
        "heads": {}, "files": {}, "ignored": list(found["ignored"]), "notes": [],
    }
    by_input_hash: dict[str, str] = {}
    jobs: list[tuple[str, str | None, Path]] = []
    if found["pretrained"] is not None:
        jobs.append(("pretrained", None, found["pretrained"]))
    jobs += [("expert", t, p) for t, p in found["experts"].items()]
    jobs += [("task_zeroshot", t, p) for t, p in found["task_zeroshot"].items()]
    jobs += [("head", t, p) for t, p in found["heads"].items()]
    for kind, task, path in jobs:
        rel_in = path.relative_to(src).as_posix()
        rel_out = rel_in[: -len(".pt")] + ".safetensors"
        input_hash = sha256_file(path)
        entry: dict[str, Any] = {"kind": kind, "task": task, "input": rel_in, "input_sha256": input_hash}
        if kind != "head" and input_hash in by_input_hash:
            rel_out = by_input_hash[input_hash]  # byte-identical pickle: reuse the converted file
            entry["same_as_input_of"] = rel_out
            manifest["files"].setdefault(rel_out, {}).setdefault("also_from", []).append(rel_in)
        else:
            graph = safe_load(path)
            out_path = tmp / rel_out
            out_path.parent.mkdir(parents=True, exist_ok=True)
            metadata = {"format": "pt", "symerge": FORMAT, "source": rel_in, "source_sha256": input_hash}
            if kind == "head":
                tensors, normalize = _head_from_graph(graph, str(path))
                if normalize is None:
                    manifest["notes"].append(f"{rel_in}: no 'normalize' flag found; assuming normalize=true (task_vectors heads)")
                    normalize = True
                metadata["normalize"] = str(normalize).lower()
                entry.update({"normalize": normalize, "num_classes": int(tensors["weight"].shape[0]),
                              "features": int(tensors["weight"].shape[1]),
                              "root_class": graph.class_path if isinstance(graph, InertObject) else type(graph).__name__})
            else:
                tensors = extract_state_dict(graph, str(path))
                if not tensors:
                    raise ValidationError(f"{path}: holds no tensors")
                entry.update(_model_info(graph, tensors))
            save_file(_unshared(tensors), str(out_path), metadata=metadata)
            del graph, tensors
            entry["sha256"] = sha256_file(out_path)
            if kind != "head":
                by_input_hash[input_hash] = rel_out
            manifest["files"][rel_out] = {**manifest["files"].get(rel_out, {}), **entry}
        if kind == "pretrained":
            manifest["pretrained"] = rel_out
        elif kind == "expert":
            manifest["experts"][task] = rel_out
        elif kind == "task_zeroshot":
            manifest["task_zeroshot"][task] = rel_out
        else:
            manifest["heads"][task] = rel_out
    if manifest["pretrained"] is None and manifest["task_zeroshot"]:
        first = sorted(manifest["task_zeroshot"])[0]
        manifest["pretrained"] = manifest["task_zeroshot"][first]
        manifest["notes"].append(f"no top-level zeroshot.pt: using {found['task_zeroshot'][first].relative_to(src).as_posix()} as the pretrained model")
    tasks = sorted(set(manifest["experts"]) | set(manifest["heads"]) | set(manifest["task_zeroshot"]))
    manifest["tasks"] = tasks
    manifest["incomplete"] = {
        t: [what for what, table in (("finetuned", "experts"), ("head", "heads")) if t not in manifest[table]]
        for t in tasks if t not in manifest["experts"] or t not in manifest["heads"]
    }
    return manifest


def convert_task_vectors_dir(src_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Convert a task_vectors checkpoint dir to safetensors + convert.json in `out_dir`; return the manifest.

    Refuses an existing non-empty `out_dir` unless `overwrite`. Nothing is written to `out_dir` unless every file
    converts (a refused pickle raises `ValidationError` naming the file and the refused global).
    """
    src = Path(src_dir)
    out = Path(out_dir)
    found = find_task_vectors_files(src)
    src_resolved, out_resolved = src.resolve(), out.resolve()
    if out_resolved == src_resolved or out_resolved in src_resolved.parents:
        raise ValidationError(f"output dir '{out}' would replace the source dir '{src}'")
    prepare_output_dir(out, overwrite, (MANIFEST,))
    with atomic_directory(out, replace=overwrite, manifests=(MANIFEST,)) as tmp:
        manifest = _convert_into(found, src, tmp)
        manifest["outputs_sha256"] = {name: info["sha256"] for name, info in manifest["files"].items() if "sha256" in info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_convert_manifest(directory: Path) -> dict[str, Any] | None:
    """The convert.json of a `symerge convert` output dir, or None when `directory` is not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValidationError(f"'{path}' is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValidationError(f"'{path}' is not a `symerge convert` manifest (format {FORMAT!r})")
    return manifest


def converted_task(root: Path, manifest: Mapping[str, Any], path: Path) -> str | None:
    """The converted task an expert path names: `<root>/<Task>` or `<root>/<Task>/finetuned.safetensors`, where the
    task has both a finetuned model and a head; None otherwise."""
    target = Path(path).resolve()
    for task, rel in manifest.get("experts", {}).items():
        if task in manifest.get("heads", {}) and target in ((root / task).resolve(), (root / rel).resolve()):
            return task
    return None


def merge_hint(out: Path, manifest: Mapping[str, Any]) -> str:
    """How to feed this output to `symerge merge` (convert's last printed line)."""
    tasks = [t for t in manifest.get("experts", {}) if t in manifest.get("heads", {})]
    experts = ", ".join(f"{t}: {out / t}" for t in tasks) or "<Task>: <dir>/<Task>"
    return (f"merge it: symerge merge CONFIG.yaml with model: {{family: clip, pretrained: {out}, experts: {{{experts}}}}}"
            " (see README, 'Merging your own checkpoints')")


def cmd_convert(args: argparse.Namespace) -> int:
    manifest = convert_task_vectors_dir(args.src_dir, args.out_dir, overwrite=args.overwrite)
    print(f"converted {len([f for f in manifest['files'].values() if 'sha256' in f])} file(s) into {args.out_dir}")
    print(f"  pretrained: {manifest['pretrained'] or '-'}")
    print(f"  experts:    {', '.join(manifest['experts']) or '-'}")
    print(f"  heads:      {', '.join(manifest['heads']) or '-'}")
    for task, missing in manifest["incomplete"].items():
        print(f"  task '{task}' lacks: {', '.join(missing)}")
    for note in manifest["notes"]:
        print(f"  note: {note}")
    if manifest["ignored"]:
        print(f"  ignored: {', '.join(manifest['ignored'])}")
    print(merge_hint(Path(args.out_dir), manifest))
    return 0


def register_convert_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `symerge convert SRC_DIR OUT_DIR [--overwrite]` to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "convert", help="convert task_vectors / open_clip pickles to safetensors (no pickled code is run)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("src_dir", help="task_vectors checkpoint dir (zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt)")
    parser.add_argument("out_dir", help="output dir for safetensors files and convert.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output dir")
    parser.set_defaults(func=cmd_convert)
    return parser
