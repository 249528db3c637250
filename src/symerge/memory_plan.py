"""How much memory a merge / adaptation run needs, estimated before any weight is loaded (`symerge plan CONFIG`).

The model (bytes; P = parameters of the shared encoder, P_τ = its merged floating tensors, K = tasks):

| part | bytes | held |
|---|---|---|
| runtime (Python, torch, transformers) | `RUNTIME_BYTES` (measured) | always |
| θ_pre, the pretrained encoder | P × weight bytes (+ P_τ × 4 for an fp32 copy when stored narrower) | always |
| experts held by `symerge merge` | K × P × weight bytes (families whose pool keeps every expert encoder: clip) | merge path |
| τ | K × P_τ × storage bytes (4 fp32, 2 bf16) | always |
| λ | rows × K × 4 × 4 (value, gradient, two Adam moments) | adaptive |
| task layers | Σ head params × 4 × 4 (value, gradient, two Adam moments) | adaptive |
| cached expert outputs / features | Σ_t N_t × (feature dim + outputs) × 4 | adaptive |
| adaptation inputs | Σ_t N_t × tokens × 8 × input tensors (int64 token ids, masks) | adaptive |
| one step's graph | P_τ × 4 (θ rebuilt in fp32) + activations + 2 × largest tensor × 4 (backward buffers) | adaptive |

Activations saved for backward of a transformer are batch × tokens × hidden × (layers × c_layer + c_fixed) bytes:
c_layer = 64 for GELU (BERT-style) and 80 for quick-GELU (CLIP) blocks, c_fixed = 16 — counted on this torch /
transformers (fp32, SDPA attention: no tokens² attention matrix is saved) by summing the storages autograd saves
(see `tests/test_memory_plan.py`). The runtime constant and the whole model were checked against the measured
peak RSS of `symerge merge` runs (`benchmarks/memory_plan_check.py`).

Why pure functions of shapes: the plan must be printable for a 20 × ViT-L/14 config on a laptop that could never
load it, so it reads only config.json files, safetensors headers and the data files' row counts.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symerge.errors import ValidationError

MiB = 2**20
GiB = 2**30
# Peak RSS of a `symerge merge` run on a tiny model (torch, transformers, tokenizers and symerge's pipeline imported,
# one tiny load / adapt / export; measured on the CPU build with `benchmarks/memory_plan_check.py --tiny`).
RUNTIME_BYTES = 490 * MiB
# Bytes saved for backward per (sample · token · hidden unit), per transformer block and once for the embeddings.
ACTIVATION_PER_LAYER = {"gelu": 64.0, "quick_gelu": 80.0}
ACTIVATION_FIXED = 16.0
STORAGE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about the shared encoder (parameter counts, not weights)."""

    encoder_params: int  # floating entries of the shared encoder (θ_pre)
    merged_params: int  # of which are merged (each task vector has this many entries)
    largest_tensor: int  # entries of the largest merged tensor (its gradient buffers are the backward transient)
    hidden: int
    layers: int
    tokens: int  # tokens per sample: text max length, or (image / patch)² + 1 for a ViT
    feature_dim: int  # width of the encoder output the heads read
    weight_bytes: int = 4  # bytes per stored weight (the checkpoints' dtype, or model.dtype)
    activation_per_layer: float = ACTIVATION_PER_LAYER["gelu"]
    input_tensors: int = 2  # int64 tensors per text sample (ids, mask, token types); 0 for images (counted apart)
    input_bytes_per_sample: int = 0  # image inputs: channels × height × width × 4
    tensors: int = 1  # merged tensors (rows of λ at granularity "tensor")


@dataclass(frozen=True)
class RunShape:
    """What the run does: tasks, adaptation data sizes and the knobs that change memory."""

    tasks: list[str]
    samples: dict[str, int]  # adaptation inputs per task (N_t)
    outputs: dict[str, int]  # head output width per task
    head_params: dict[str, int]  # trainable task-layer parameters per task
    batch_size: int = 16
    storage_dtype: str = "float32"
    adaptive: bool = True
    lambda_rows: int = 1  # rows of λ (merged tensors for granularity "tensor")
    experts_held: bool = True  # the family's pool keeps every loaded expert encoder until the run ends (clip)
    tau_materialised: bool = True  # False: a separable static method streams τ one tensor at a time

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


@dataclass
class MemoryPlan:
    """Resident parts plus the larger of the two transient peaks (one adaptation step, or writing the result)."""

    resident: dict[str, int] = field(default_factory=dict)
    step: dict[str, int] = field(default_factory=dict)
    export: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def step_peak(self) -> int:
        return sum(self.resident.values()) + sum(self.step.values())

    @property
    def export_peak(self) -> int:
        # τ, the expert cache and the inputs are freed once the adapted result is built
        freed = sum(v for k, v in self.resident.items() if k.startswith(("τ", "cached", "adaptation inputs", "λ",
                                                                          "task layers")))
        return sum(self.resident.values()) - freed + sum(self.export.values())

    @property
    def peak(self) -> int:
        return max(self.step_peak, self.export_peak)

    def table(self) -> str:
        """Markdown: every part in MiB and the peak."""
        rows = ["| part | MiB |", "|---|---:|"]
        rows += [f"| {name} | {value / MiB:,.1f} |" for name, value in self.resident.items()]
        rows += [f"| step: {name} | {value / MiB:,.1f} |" for name, value in self.step.items()]
        rows += [f"| export: {name} | {value / MiB:,.1f} |" for name, value in self.export.items()]
        rows.append(f"| **peak (max of step, export)** | **{self.peak / MiB:,.0f}** |")
        return "\n".join(rows + [f"\n{note}" for note in self.notes])


# --- the model ---------------------------------------------------------------------------------------------------
def storage_bytes(dtype: str) -> int:
    """Bytes per τ entry for a storage dtype name."""
    if dtype not in STORAGE_BYTES:
        raise ValidationError(f"storage dtype '{dtype}' unknown; choose one of {sorted(STORAGE_BYTES)}")
    return STORAGE_BYTES[dtype]


def tau_bytes(num_tasks: int, merged_params: int, storage_dtype: str = "float32") -> int:
    """K × P_τ × storage bytes: the stacked task vectors."""
    return num_tasks * merged_params * storage_bytes(storage_dtype)


def activation_bytes(batch: int, tokens: int, hidden: int, layers: int,
                     per_layer: float = ACTIVATION_PER_LAYER["gelu"], fixed: float = ACTIVATION_FIXED) -> int:
    """Activations autograd saves for one forward of a transformer encoder (see the module docstring)."""
    return int(batch * tokens * hidden * (layers * per_layer + fixed))


def adam_bytes(params: int) -> int:
    """A trainable fp32 tensor with its gradient and two Adam moments."""
    return params * 4 * 4


def expert_cache_bytes(samples: Mapping[str, int], feature_dim: int, outputs: Mapping[str, int]) -> int:
    """Expert features and head outputs cached once per adaptation input (fp32, on the CPU)."""
    return sum(n * (feature_dim + outputs[t]) * 4 for t, n in samples.items())


def plan_memory(model: ModelShape, run: RunShape) -> MemoryPlan:
    """The memory plan of a run (pure: shapes in, bytes out)."""
    k = run.num_tasks
    plan = MemoryPlan()
    plan.resident["runtime (Python, torch, transformers)"] = RUNTIME_BYTES
    plan.resident["θ_pre (pretrained encoder)"] = model.encoder_params * model.weight_bytes
    if model.weight_bytes != 4:
        plan.resident["θ_pre fp32 copy (merged tensors)"] = model.merged_params * 4
    if run.experts_held:
        plan.resident[f"experts held by the pool ({k} encoders)"] = k * model.encoder_params * model.weight_bytes
    if run.tau_materialised:
        plan.resident[f"τ ({k} × {model.merged_params / 1e6:.3g} M × {run.storage_dtype})"] = tau_bytes(
            k, model.merged_params, run.storage_dtype)
    else:
        plan.resident["τ streamed (one tensor's [K, block] at a time)"] = k * model.largest_tensor * 4
    heads = sum(run.head_params.values())
    if not run.adaptive:
        plan.resident["task heads"] = heads * 4
        plan.export["merged encoder + its serialised copy"] = 2 * model.encoder_params * 4
        return plan
    plan.resident["λ (value, gradient, Adam)"] = adam_bytes(run.lambda_rows * k)
    plan.resident["task layers (value, gradient, Adam)"] = adam_bytes(heads)
    plan.resident["cached expert outputs and features"] = expert_cache_bytes(run.samples, model.feature_dim, run.outputs)
    per_sample = model.input_tensors * model.tokens * 8 + model.input_bytes_per_sample
    plan.resident["adaptation inputs"] = sum(run.samples.values()) * per_sample
    plan.step["θ rebuilt in fp32"] = model.merged_params * 4
    plan.step[f"activations (batch {run.batch_size} × {model.tokens} tokens)"] = activation_bytes(
        run.batch_size, model.tokens, model.hidden, model.layers, model.activation_per_layer)
    plan.step["backward buffers (2 × largest tensor)"] = 2 * model.largest_tensor * 4
    plan.export["merged encoder + its serialised copy"] = 2 * model.encoder_params * 4
    return plan


# --- shapes from files (no weights) ------------------------------------------------------------------------------
def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (the first 8 bytes give its length); tensors are never read."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValidationError(f"'{path}' is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * MiB:
                raise ValidationError(f"'{path}': safetensors header of {length} bytes is implausible (corrupt file?)")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValidationError(f"'{path}' has no readable safetensors header: {err}") from None
    header.pop("__metadata__", None)
    return header


def header_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of a file, or of every .safetensors file of a directory."""
    if not path.exists():
        raise ValidationError(f"'{path}' does not exist")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ValidationError(f"'{path}' holds no .safetensors file")
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        for name, info in safetensors_header(file).items():
            shapes[name] = (tuple(info["shape"]), info["dtype"])
    return shapes


def stored_weight_bytes(source: str, forced: str | None) -> int:
    """Bytes per weight: model.dtype when set, else the first floating tensor of a local safetensors file, else 4."""
    if forced and forced != "auto":
        return storage_bytes(forced)
    path = Path(source)
    if path.exists() and (path.suffix == ".safetensors" or any(path.glob("*.safetensors"))):
        for _, dtype in header_shapes(path).values():
            if dtype in SAFETENSORS_BYTES:
                return SAFETENSORS_BYTES[dtype]
    return 4


def count_floating(module: Any) -> tuple[int, int, int]:
    """(floating entries, largest floating tensor, floating tensors) of a module's state dict (meta device too)."""
    sizes = [v.numel() for v in module.state_dict().values() if v.is_floating_point()]
    return sum(sizes), max(sizes, default=0), len(sizes)


def meta_model(build: Any) -> Any:
    """A model built on the meta device: shapes without memory or weights."""
    import torch

    with torch.device("meta"):
        return build()


def data_samples(cfg: Any) -> dict[str, int]:
    """Adaptation inputs per task, counted from the data files (text rows or image files)."""
    from symerge.errors import FieldError
    from symerge.models.families import get_family

    family = get_family(cfg.model.family)
    counts = {}
    for task, value in cfg.data.adapt.items():
        try:
            counts[task] = family.count_inputs(cfg, cfg.path(value), f"data.adapt.{task}")
        except FieldError as err:
            raise ValidationError(f"{cfg.source}: {err.field}: {err.why}") from None
    return counts


def text_shapes(cfg: Any) -> tuple[ModelShape, dict[str, int], dict[str, int]]:
    """hf_text: the classifier of each expert built on the meta device from its config.json."""
    from transformers import AutoModelForSequenceClassification

    from symerge.models.hf_text import read_config, split_classifier

    outputs: dict[str, int] = {}
    heads: dict[str, int] = {}
    encoder_stats: tuple[int, int, int] | None = None
    config = None
    for task, value in cfg.model.experts.items():
        config = read_config(cfg.model_source(value), f"model.experts.{task}")
        model = meta_model(lambda: AutoModelForSequenceClassification.from_config(config))
        encoder, head = split_classifier(model)
        encoder_stats = encoder_stats or count_floating(encoder)
        heads[task] = sum(p.numel() for p in head.parameters())
        outputs[task] = int(config.num_labels)
    assert encoder_stats is not None and config is not None
    params, largest, tensors = encoder_stats
    act = ACTIVATION_PER_LAYER["quick_gelu" if getattr(config, "hidden_act", "") == "quick_gelu" else "gelu"]
    tokens = min(cfg.data.max_len, int(getattr(config, "max_position_embeddings", cfg.data.max_len)))
    inputs = 3 if getattr(config, "type_vocab_size", 0) else 2
    shape = ModelShape(
        encoder_params=params, merged_params=params, largest_tensor=largest, hidden=int(config.hidden_size),
        layers=int(config.num_hidden_layers), tokens=tokens, feature_dim=int(config.hidden_size),
        weight_bytes=stored_weight_bytes(cfg.model_source(cfg.model.pretrained), cfg.model.dtype),
        activation_per_layer=act, input_tensors=inputs, tensors=tensors)
    return shape, outputs, heads


def clip_shapes(cfg: Any) -> tuple[ModelShape, dict[str, int], dict[str, int]]:
    """clip: the vision tower + projection built on the meta device from the pretrained CLIPModel's config.json."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from symerge.models.hf_text import read_config

    config = read_config(cfg.model_source(cfg.model.pretrained), "model.pretrained")
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValidationError(f"model.pretrained: '{cfg.model.pretrained}' has no vision_config in its config.json "
                              "(a `symerge convert` output or another layout: `symerge plan` reads HF CLIPModel dirs)")
    vcfg = CLIPVisionConfig(**{**vision.to_dict(), "projection_dim": config.projection_dim})
    params, largest, tensors = count_floating(meta_model(lambda: CLIPVisionModelWithProjection(vcfg)))
    names = cfg.model.class_names or {}
    outputs = {t: len(names.get(t, [])) for t in cfg.tasks}
    heads = {t: n * int(config.projection_dim) for t, n in outputs.items()}
    tokens = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2 + 1
    act = ACTIVATION_PER_LAYER["quick_gelu" if vcfg.hidden_act == "quick_gelu" else "gelu"]
    shape = ModelShape(
        encoder_params=params, merged_params=params, largest_tensor=largest, hidden=int(vcfg.hidden_size),
        layers=int(vcfg.num_hidden_layers), tokens=tokens, feature_dim=int(config.projection_dim),
        activation_per_layer=act, input_tensors=0, input_bytes_per_sample=3 * int(vcfg.image_size) ** 2 * 4,
        tensors=tensors)
    return shape, outputs, heads


def state_dict_shapes(cfg: Any) -> tuple[ModelShape, dict[str, int], dict[str, int]]:
    """state_dict: every tensor's shape from the pretrained file's safetensors header (static methods only)."""
    shapes = header_shapes(cfg.path(cfg.model.pretrained))
    prefixes = tuple(cfg.model.head_prefixes or ())
    floating = {k: math.prod(s) for k, (s, d) in shapes.items() if d in SAFETENSORS_BYTES}
    encoder = {k: n for k, n in floating.items() if not (prefixes and k.startswith(prefixes))}
    head = sum(n for k, n in floating.items() if prefixes and k.startswith(prefixes))
    bytes_per = next((SAFETENSORS_BYTES[d] for _, d in shapes.values() if d in SAFETENSORS_BYTES), 4)
    forced = cfg.model.dtype
    shape = ModelShape(
        encoder_params=sum(encoder.values()), merged_params=sum(encoder.values()),
        largest_tensor=max(encoder.values(), default=0), hidden=0, layers=0, tokens=0, feature_dim=0,
        weight_bytes=storage_bytes(forced) if forced != "auto" else bytes_per, tensors=len(encoder))
    return shape, {t: 0 for t in cfg.tasks}, {t: head for t in cfg.tasks}


def plan_config(cfg: Any) -> tuple[MemoryPlan, ModelShape, RunShape]:
    """The plan of a validated `MergeConfig` (`symerge.config.load_config`), from files' metadata only."""
    from symerge.adaptive.registry import get_adaptive
    from symerge.models.families import get_family

    readers = {"hf_text": text_shapes, "clip": clip_shapes, "state_dict": state_dict_shapes}
    if cfg.model.family not in readers:
        raise ValidationError(f"{cfg.source}: model.family: `symerge plan` has no shape reader for family "
                              f"'{cfg.model.family}' yet (it has: {sorted(readers)})")
    model, outputs, heads = readers[cfg.model.family](cfg)
    spec = get_adaptive(cfg.method.name) if cfg.adaptive else None
    coefficients_only = spec is not None and spec.trains_coefficients_only(cfg.method.options)
    trainer = cfg.trainer_config().resolved(coefficients_only=coefficients_only) if cfg.adaptive else None
    task_layer = str(cfg.method.options.get("task_layer", "head"))
    trains_heads = cfg.method.name == "symerge" and not coefficients_only and task_layer == "head"
    if cfg.adaptive and not trains_heads:
        # frozen heads: no gradient or Adam state (λ-only runs, AdaMerging, Surgery; SyMerge's block task layers
        # are not modelled: see notes)
        heads = {t: 0 for t in heads}
    granularity = cfg.method.options.get("granularity", spec.granularity if spec is not None else "tensor")
    run = RunShape(
        tasks=cfg.tasks, samples=data_samples(cfg) if cfg.adaptive else {}, outputs=outputs, head_params=heads,
        batch_size=int(trainer.batch_size) if trainer else 0, storage_dtype=cfg.method.storage_dtype,
        adaptive=cfg.adaptive, lambda_rows=lambda_rows(model, granularity),
        experts_held=get_family(cfg.model.family).holds_experts,
        tau_materialised=cfg.adaptive or not separable(cfg.method.name))
    plan = plan_memory(model, run)
    if cfg.adaptive and cfg.model.family == "hf_text":
        plan.notes.append(f"activations assume every text fills data.max_len = {model.tokens} tokens (an upper "
                          "bound: batches are trimmed to their longest text).")
    if cfg.method.name == "symerge" and task_layer != "head":
        plan.notes.append(f"task_layer '{task_layer}': per-task encoder blocks (value, gradient, Adam) are not in "
                          "this estimate.")
    if cfg.method.name == "surgery":
        plan.notes.append("Surgery's adapters (small) are not in this estimate.")
    if str(cfg.device) != "cpu":
        plan.notes.append(f"device '{cfg.device}': τ, θ_pre, the graph and the trainable state live on the device; "
                          "this is the total of host and device memory.")
    return plan, model, run


def separable(method: str) -> bool:
    """Whether `symerge merge` runs a static method on the streaming engine (τ never stacked in full)."""
    from symerge.merging import get_method

    return bool(getattr(get_method(method), "separable", False))


def lambda_rows(model: ModelShape, granularity: str) -> int:
    """Rows of λ: one per merged tensor, per block (≈ layers + 2), or one."""
    return {"task": 1, "block": model.layers + 2}.get(granularity, model.tensors)


def vit_shape(width: int, layers: int, patch: int, image: int, params: int, embed_dim: int) -> ModelShape:
    """A CLIP ViT vision tower from its published shape (for the README table; `params` as published)."""
    largest = max(4 * width * width, embed_dim * width)
    return ModelShape(encoder_params=params, merged_params=params, largest_tensor=largest, hidden=width,
                      layers=layers, tensors=16 * layers + 8, tokens=(image // patch) ** 2 + 1, feature_dim=embed_dim,
                      activation_per_layer=ACTIVATION_PER_LAYER["quick_gelu"], input_tensors=0,
                      input_bytes_per_sample=3 * image * image * 4)


def format_plan(plan: MemoryPlan, model: ModelShape, run: RunShape, source: str = "") -> str:
    """What `symerge plan` prints."""
    head = (f"memory plan{f' for {source}' if source else ''}: {run.num_tasks} tasks, encoder "
            f"{model.encoder_params / 1e6:.3g} M params ({model.weight_bytes} bytes each), τ in {run.storage_dtype}")
    if run.adaptive:
        head += (f", batch {run.batch_size}, {sum(run.samples.values())} adaptation inputs, "
                 f"{model.tokens} tokens/sample")
    return "\n".join([head, "", plan.table(), "",
                      f"estimated peak: {plan.peak / GiB:.2f} GiB (step {plan.step_peak / GiB:.2f} GiB, "
                      f"writing the result {plan.export_peak / GiB:.2f} GiB)"])


def cmd_plan(args: Any) -> int:
    """`symerge plan CONFIG.yaml`: validate the config, print the estimate; nothing is loaded or written."""
    from symerge.config import load_config

    cfg = load_config(args.config, overwrite=True)  # the output dir is not written: an existing one is fine here
    plan, model, run = plan_config(cfg)
    print(format_plan(plan, model, run, str(args.config)))
    return 0


def register_plan_command(sub: Any) -> None:
    """Adds `symerge plan CONFIG` to the CLI's subcommands (kept here so cli.py needs one line)."""
    parser = sub.add_parser("plan", help="print the memory estimate of a merge config before loading anything")
    parser.add_argument("config", help="a `symerge merge` config file")
    parser.set_defaults(func=cmd_plan)


# Published CLIP vision towers (width, layers, patch, image size, parameters, embedding dim) for the README table.
CLIP_VISION = {"ViT-B/32": (768, 12, 32, 224, 87_800_000, 512), "ViT-L/14": (1024, 24, 14, 224, 303_000_000, 768)}


def clip_table(tasks: tuple[int, ...] = (8, 14, 20), samples: int = 2000, classes: int = 100,
               batch: int = 32) -> str:
    """The README's estimate for CLIP vision towers (adaptation through the API: experts not held), in GiB."""
    rows = [f"| model | K | τ fp32 | τ bf16 | θ_pre + λ + heads + expert cache | one step (θ + activations, batch {batch}) "
            f"| inputs ({samples} images/task, fp32) | peak, fp32 τ | peak, bf16 τ | + experts held by `symerge merge` |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (width, layers, patch, image, params, embed) in CLIP_VISION.items():
        shape = vit_shape(width, layers, patch, image, params, embed)
        for k in tasks:
            names = [f"t{i}" for i in range(k)]
            run = RunShape(tasks=names, samples={t: samples for t in names}, outputs={t: classes for t in names},
                           head_params={t: classes * embed for t in names}, batch_size=batch,
                           lambda_rows=shape.tensors, experts_held=False)
            fp32 = plan_memory(shape, run)
            bf16 = plan_memory(shape, RunShape(**{**run.__dict__, "storage_dtype": "bfloat16"}))
            inputs = fp32.resident["adaptation inputs"]
            other = sum(v for key, v in fp32.resident.items() if not key.startswith(("τ", "adaptation", "runtime")))
            rows.append(f"| {name} | {k} | {tau_bytes(k, params) / GiB:.1f} | {tau_bytes(k, params, 'bfloat16') / GiB:.1f}"
                        f" | {other / GiB:.1f} | {sum(fp32.step.values()) / GiB:.1f} | {inputs / GiB:.1f} "
                        f"| {fp32.peak / GiB:.1f} | {bf16.peak / GiB:.1f} | +{k * params * 4 / GiB:.1f} |")
    return "\n".join(rows)
