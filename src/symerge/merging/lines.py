"""LiNeS (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
ICLR 2025), multi-task merging variant.

The merged update τ_MTL of a base method (task arithmetic's Σ_t τ_t by default, taken with scaling 1) is scaled
per layer, linearly in depth, instead of by one global coefficient:
    λ(ℓ) = α + β · ℓ / (L − 1),    ℓ = 0 … L−1 the block index,    θ = θ_pre + λ(ℓ) τ_MTL(ℓ)
(the paper's λ(ℓ) = α + β (ℓ−1)/(L−1) with 1-based ℓ), so shallow blocks stay close to the pre-trained weights
and deep blocks keep the task-specific updates. For multi-task merging the official code sets
    α = (1/K) · ‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁
(α = 1/K for task arithmetic: the shallowest block gets the task-vector *average*) and tunes β on validation
data.

Options → symbols:
- `beta` = β, default 0.5. The official code picks β from {0.1, 0.2, …, 1.0} on validation data; 0.5 is the
  middle of that grid and gives task arithmetic on 8 tasks a depth profile from 1/8 to 0.625 (around the 0.3 a
  uniform coefficient uses). Tune it on validation data when available.
- `alpha` = α, default None → the official rule above; a float overrides it.
- `base` / `base_options`: the registered static method producing τ_MTL (default "task_arithmetic"); its
  `scaling_coef`, if it has one, defaults to 1.0 here because LiNeS replaces the global coefficient.
- `layer_index`: an explicit dict tensor name -> block index ℓ (0-based, one stack, L = max ℓ + 1); it takes
  precedence over name parsing for the tensors it lists.
- `outside_blocks`: scaling of tensors that are in no block. "alpha" (default, official code: every such
  tensor — embeddings, final norm, projection, pooler — gets α); "by_position": embedding-like tensors (names
  containing embed / wte / wpe / cls_token / class_embedding / patch / conv1 / ln_pre / pre_layrnorm /
  token_type) get α, all others (final norm, projection, pooler, head) get α + β.

Block indices are parsed from names: the leftmost `<container>.<N>.` with container one of
    layer, layers     BERT / RoBERTa / HF ViT (`encoder.layer.N.`), HF CLIP (`encoder.layers.N.`), Llama
    resblocks         open_clip (`transformer.resblocks.N.`)
    features          torchvision (`features.N.`)
    h, blocks, block  GPT-2, timm ViT, T5
Each stack (the name part before `.N.`, e.g. a CLIP's text and vision towers) has its own depth L = its largest
index + 1 over the pretrained model's tensors; a stack with one block gets ℓ / (L − 1) := 0. If no merged
tensor matches and no `layer_index` is given, a ValidationError says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from symerge.errors import ValidationError
from symerge.merging.registry import Delta, get_method, register
from symerge.taskvectors import TaskVectors

BLOCK_CONTAINERS = ("layer", "layers", "resblocks", "features", "h", "blocks", "block")
BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:" + "|".join(BLOCK_CONTAINERS) + r")\.(\d+)(?=\.|$)")
EMBEDDING_PATTERN = re.compile(
    r"embed|(?:^|\.)(?:wte|wpe|cls_token|patch\w*|conv1|ln_pre|pre_layrnorm|token_type\w*)(?:\.|$)"
)


def parse_block(name: str) -> tuple[str, int] | None:
    """(stack prefix, block index) of a parameter name, or None when it is in no recognised block."""
    match = BLOCK_PATTERN.search(name)
    if match is None:
        return None
    return name[: match.start(1) - 1], int(match.group(1))


def depth_fractions(
    keys: Iterable[str],
    all_names: Iterable[str],
    layer_index: Mapping[str, int] | None = None,
    outside_blocks: str = "alpha",
) -> dict[str, float]:
    """ℓ / (L − 1) ∈ [0, 1] for every key in `keys`; raises when no depth information is available."""
    if outside_blocks not in ("alpha", "by_position"):
        raise ValidationError(f"lines: outside_blocks must be 'alpha' or 'by_position', got '{outside_blocks}'")
    keys = list(keys)
    given = dict(layer_index or {})
    for name, index in given.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValidationError(f"lines: layer_index['{name}'] must be a non-negative int, got {index!r}")
    unknown = [name for name in given if name not in set(all_names) | set(keys)]
    if unknown:
        raise ValidationError(f"lines: layer_index names tensor '{unknown[0]}', which is not in the model")
    depth_of_given = max(given.values()) + 1 if given else 0
    stacks: dict[str, int] = {}
    for name in set(all_names) | set(keys):
        parsed = parse_block(name)
        if parsed is not None:
            stacks[parsed[0]] = max(stacks.get(parsed[0], 0), parsed[1] + 1)

    fractions: dict[str, float] = {}
    matched = 0
    for key in keys:
        if key in given:
            depth, index = depth_of_given, given[key]
        else:
            parsed = parse_block(key)
            if parsed is None:
                fractions[key] = 1.0 if outside_blocks == "by_position" and not EMBEDDING_PATTERN.search(key) else 0.0
                continue
            depth, index = stacks[parsed[0]], parsed[1]
        matched += 1
        fractions[key] = index / (depth - 1) if depth > 1 else 0.0
    if keys and matched == 0:
        sample = ", ".join(f"'{k}'" for k in keys[:3])
        raise ValidationError(
            "lines: cannot find layer depths: no merged tensor name contains a block index "
            f"(<{'|'.join(BLOCK_CONTAINERS)}>.N., e.g. 'encoder.layer.3.', 'transformer.resblocks.3.'); "
            f"names look like {sample}. Pass layer_index={{tensor name: block index}}."
        )
    return fractions


@register("lines")
def lines(
    tv: TaskVectors,
    *,
    beta: float = 0.5,
    alpha: float | None = None,
    base: str = "task_arithmetic",
    base_options: Mapping[str, Any] | None = None,
    layer_index: Mapping[str, int] | None = None,
    outside_blocks: str = "alpha",
) -> Delta:
    """LiNeS: τ_MTL of `base` scaled by α + β·ℓ/(L−1) per block (see the module docstring)."""
    fractions = depth_fractions(tv.keys, tv.pretrained.keys(), layer_index, outside_blocks)
    spec = get_method(base)
    if spec.per_task or base == "lines":
        raise ValidationError(f"lines: base must be a single-model static method, got '{base}'")
    options = dict(base_options or {})
    if "scaling_coef" in spec.defaults and "scaling_coef" not in options:
        options["scaling_coef"] = 1.0
    merged = spec.fn(tv, **spec.resolve_options(options))
    if alpha is None:
        summed = sum(float(vec.sum(dim=0).abs().sum()) for _, vec in tv.items_float())
        norm = sum(float(v.abs().sum()) for v in merged.values())
        alpha = (summed / norm if norm > 0 else 1.0) / tv.num_tasks
    return {key: value * (alpha + beta * fractions[key]) for key, value in merged.items()}
