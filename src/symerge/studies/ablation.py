"""What trains and which layer (paper Table 5, Table B and App. D.4).

1. Components: λ only (task layer frozen, self-label loss), the task layer only (λ frozen at its init), and both
   jointly (SyMerge) — Table 5 — plus the fraction of learned λ below 1e-5 for λ-only vs joint (App. D.4).
2. Which layer: the head (= the joint row) against each numbered encoder block as the one task-specific layer
   (`task_layer="block:<block>"`, λ still trained), and the early / middle / late thirds of the blocks trained
   together (`"blocks:..."`) — Table B (whose groups are halves: Early = blocks 1–6, Late = 7–12).
The blocks are found from the task vectors' tensor names (`merged_encoder.numbered_block`); an encoder without
numbered blocks gets part 1 only. Every row uses the suite's adaptation settings (same learning rates and steps).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from torch import Tensor

from symerge.adaptive.merged_encoder import numbered_block
from symerge.errors import ValidationError
from symerge.studies.bars import averages, bars_figure, rows
from symerge.studies.base import (StudyContext, StudyOutput, Variant, VariantOutcome, positive_number,
                                  register_study, variants_table)

SPARSE_BELOW = 1e-5  # App. D.4: a coefficient "near zero"
COMPONENTS = (
    Variant("coef-only", options={"train_layer": False}),
    Variant("layer-only", options={"train_coefficients": False}),
    Variant("joint (SyMerge)"),
)
THIRDS = ("early", "middle", "late")
PAPER_TABLE5 = ("Paper (Table 5, ViT-B/32, avg acc %): coef-only 84.6 / layer-only 88.2 / joint 90.1 on 8 tasks; "
                "82.4 / 83.0 / 88.7 on 14; 81.6 / 75.0 / 88.6 on 20.")
PAPER_SPARSITY = ("Paper (App. D.4): share of learned λ < 1e-5 rises from 37.2 % (coef-only, acc 84.6) to 55.9 % "
                  "(joint, 90.1) on ViT-B/32, and from 23.3 % to 55.0 % on ViT-L/14.")
PAPER_TABLE_B = ("Paper (Table B, ViT-B/32, 8 tasks, λ trained jointly): any single block 90.0–90.5, classifier "
                 "90.1; Early (blocks 1–6) 89.4, Late (7–12) 88.4, All 86.2.")


def natural_key(name: str) -> list:
    """'layer.10' after 'layer.9' (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def numbered_blocks(keys: Sequence[str]) -> list[str]:
    """The encoder's numbered blocks ("encoder.layer.3"), in block order, from its merged tensors' names."""
    found = {b.rstrip(".") for b in map(numbered_block, keys) if b is not None}
    return sorted(found, key=natural_key)


def block_thirds(blocks: Sequence[str]) -> dict[str, list[str]]:
    """Early / middle / late thirds of the blocks (the middle third gets the remainder's share last); {} below 3."""
    n = len(blocks)
    if n < 3:
        return {}
    return {name: list(blocks[i * n // 3:(i + 1) * n // 3]) for i, name in enumerate(THIRDS)}


def lambda_sparsity(lambdas: Tensor | None, threshold: float = SPARSE_BELOW) -> float:
    """Fraction of the learned λ (all rows and tasks, after clamping) below `threshold`."""
    if lambdas is None or lambdas.numel() == 0:
        raise ValidationError("λ sparsity needs a result with learned coefficients")
    return float((lambdas.detach() < threshold).double().mean())


check_block_lr = positive_number("block_lr")


def layer_variants(blocks: Sequence[str], block_lr: float | None = None) -> list[Variant]:
    """One row per block as the task-specific layer, then the thirds trained together; `block_lr` (default: the
    suite's task-layer lr, which is tuned for heads) is the blocks' learning rate."""
    trainer = {} if block_lr is None else {"layer_lr": block_lr}
    single = [Variant(f"block {b}", options={"task_layer": f"block:{b}"}, trainer=trainer) for b in blocks]
    groups = [Variant(f"{name} ({len(group)} blocks)", options={"task_layer": "blocks:" + ",".join(group)},
                      trainer=trainer)
              for name, group in block_thirds(blocks).items()]
    return single + groups


def relabeled(outcome: VariantOutcome, label: str) -> VariantOutcome:
    return dataclasses.replace(outcome, label=label)


def percent(value: float) -> str:
    return f"{100 * value:.1f} %"


@register_study("ablation", reproduces="paper Table 5, Table B and App. D.4",
                summary="λ only / task layer only / both; head vs each encoder block (and thirds) as the task layer; "
                        "λ sparsity", options={"block_lr": check_block_lr})
def ablation(ctx: StudyContext) -> StudyOutput:
    components = ctx.run_variants(list(COMPONENTS))
    sparsity = {label: lambda_sparsity(components[label].result.lambdas) for label in ("coef-only", "joint (SyMerge)")}
    blocks = numbered_blocks(ctx.task_vectors().keys)
    layers: dict[str, VariantOutcome] = {"head": relabeled(components["joint (SyMerge)"], "head")}
    block_lr = ctx.option("block_lr", None)
    layers.update(ctx.run_variants(layer_variants(blocks, block_lr)))

    headline = {**averages(components), **{f"task layer: {k}": v for k, v in averages(layers).items()},
                **{f"λ<1e-5 {k}": v for k, v in sparsity.items()}}
    markdown = "\n\n".join([
        "### What trains (Table 5)", variants_table(components, ctx.tasks), PAPER_TABLE5,
        "λ sparsity (share of learned λ < 1e-5): " + ", ".join(f"{k} {percent(v)}" for k, v in sparsity.items()) + ".",
        PAPER_SPARSITY,
        "### Which layer is task-specific (Table B)",
        f"Block rows train at learning rate {block_lr if block_lr is not None else ctx.settings.layer_lr} "
        "(option `block_lr`; the suite's task-layer lr is tuned for heads).",
        variants_table(layers, ctx.tasks) if blocks else
        "The encoder has no numbered blocks (tensor names like `layer.N.` / `blocks.N.`): only the head row.",
        PAPER_TABLE_B,
    ])
    figures = {
        "ablation_components.png": bars_figure({"average": averages(components)},
                                               title="What trains: λ only, task layer only, both (Table 5)"),
        "ablation_sparsity.png": bars_figure({"λ < 1e-5": sparsity}, ylabel="share of learned λ (%)",
                                             title="λ sparsity, λ only vs joint (App. D.4)"),
        "ablation_layers.png": bars_figure({"average": averages(layers)},
                                           title="Which layer is task-specific (Table B)"),
    }
    data = {"headline": headline, "block_lr": block_lr, "components": rows(components), "layers": rows(layers),
            "blocks": blocks, "thirds": block_thirds(blocks), "lambda_sparsity": sparsity, "sparse_below": SPARSE_BELOW}
    return StudyOutput(data=data, markdown=markdown, figures=figures)
