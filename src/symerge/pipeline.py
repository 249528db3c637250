"""`symerge merge CONFIG.yaml` end to end: validate, load, merge (static or adaptive), evaluate, export.

Everything that can fail on the inputs (config, checkpoints, data) is checked before the output is written; the
output directory is written atomically, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symerge.adaptive.distributed import is_main_process
from symerge.atomic import clean_stale_temp_dirs
from symerge.batching import Inputs
from symerge.config import MergeConfig, check_output, load_config, parse_config
from symerge.errors import FieldError, SymergeError, ValidationError
from symerge.export import jsonable, sha256_file, sha256_tree, write_result
from symerge.models.families import LoadedModel, get_family
from symerge.result import MergeResult


def config_error(cfg: MergeConfig, field_name: str, why: Any) -> ValidationError:
    return ValidationError(f"{cfg.source}: {field_name}: {why}")


@contextlib.contextmanager
def field_errors(cfg: MergeConfig) -> Iterator[None]:
    """A family's `FieldError` (raised with the config field it is about) as this config's `ValidationError`."""
    try:
        yield
    except FieldError as err:
        raise config_error(cfg, err.field, err.why) from None


# --- models and data: asked of the family ----------------------------------------------------------------------------
def load_model(cfg: MergeConfig, progress: bool = False) -> LoadedModel:
    with field_errors(cfg):
        return get_family(cfg.model.family).load(cfg, progress)


def task_inputs(cfg: MergeConfig, loaded: LoadedModel, split: str, task: str,
                labeled: bool) -> tuple[Inputs, Tensor | None]:
    names = loaded.class_names.get(task) if labeled else None
    if labeled and names is None:
        raise config_error(cfg, f"data.{split}.{task}", f"task '{task}' has no class names to read labels with")
    with field_errors(cfg):
        inputs, labels = get_family(loaded.family).read_inputs(cfg, loaded, split, task, names)
    return inputs, (torch.tensor(labels, dtype=torch.long) if labels is not None else None)


# --- method ----------------------------------------------------------------------------------------------------------
def run_method(cfg: MergeConfig, loaded: LoadedModel, adapt_inputs: Mapping[str, Inputs], progress: bool) -> MergeResult:
    """The configured method on the loaded pool. Separable static methods (task_arithmetic, ties, dare, ...) run
    on the streaming engine (`merging.merge`: τ one tensor at a time, never the stacked K × model task vectors);
    the others build `TaskVectors`."""
    from symerge.merging import get_method, merge, merge_delta
    from symerge.merging.registry import PerTaskDelta

    name, options = cfg.method.name, cfg.method_options()
    pool = loaded.pool
    torch.manual_seed(cfg.seed)
    try:
        if cfg.adaptive:
            from symerge.adaptive import adapt

            tv = pool.task_vectors(cfg.method.storage_dtype)
            trainer = cfg.trainer_config()
            if not progress:
                trainer = trainer.model_copy(update={"progress": False})
            kinds = options.pop("task_kinds", None)
            return adapt(name, loaded.encoder, loaded.heads, tv, dict(adapt_inputs), config=trainer, task_kinds=kinds,
                         **options)
        spec = get_method(name)
        resolved = spec.resolve_options(options)
        provenance = {"method": name, "options": resolved, "seed": cfg.seed}
        if spec.separable:
            state = merge(name, pool.pretrained, pool.experts, storage_dtype=cfg.method.storage_dtype, **options)
            return MergeResult(name, loaded.tasks, loaded.encoder, state, dict(loaded.heads), provenance=provenance)
        tv = pool.task_vectors(cfg.method.storage_dtype)
        delta = merge_delta(name, tv, **options)
    except SymergeError:
        raise
    except (TypeError, ValueError) as err:
        raise config_error(cfg, "method.options", f"method '{name}' failed with options {options}: {err}") from None
    if isinstance(delta, PerTaskDelta):
        overrides = {t: tv.apply(d) for t, d in delta.per_task.items()}
        return MergeResult(name, loaded.tasks, loaded.encoder, pool.pretrained, dict(loaded.heads),
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
    family = get_family(loaded.family)
    family.finish_result(result, loaded, cfg)
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
    info = family.export_info(loaded, cfg)
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
