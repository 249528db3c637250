"""SyMerge (Jung et al., arXiv 2412.19098): jointly learn λ and ONE task-specific layer per task from the experts'
own predictions on unlabeled data.

Task-specific layer (`task_layer`):
- "head" (default): each task's classifier, as in the paper's main results;
- "block:<path>": the encoder tensors of module <path> (whole module names: "encoder.layer.1" is layer 1, never
  layer 10 or 11) become one trainable copy per task, initialised from the task-arithmetic merge (λ =
  `block_init_coef`) of that block (paper Table B); heads then stay fixed. A path that covers more than one
  numbered block is refused (it names the blocks it would take);
- "blocks:<path>,<path>,...": several modules trained together as the task-specific layer (Table B's Early / Late /
  All rows).

What trains: `train_coefficients` (λ) and `train_layer` (the task-specific layer); either may be off (Table 5:
coefficient-only / layer-only), not both. `head_init="random"` re-initialises each head like a fresh layer
(`reset_parameters`), seeded from the trainer seed, instead of starting from the expert's head.
Objective per task (`loss`, objectives.SELF_LABEL_LOSSES, paper Fig. C): "ce" to the teacher's hard label (default;
the paper's), "kl" to its soft prediction (`labels="soft"` is the older spelling), "js", "l1", "smooth_l1", "l2",
"cosine", or AdaMerging's "entropy"; the relative confidence filter (`filter_rule`: "code", "paper", "none")
selects the samples of every loss that reads the teacher. Its default follows the paper per regime: "code" in the
vision regime, "none" in the NLP and dense regimes (`REGIME_OPTIONS`; a given `filter_rule` always wins).
Regression / dense tasks always use L1 to the teacher output.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.base import AdaptiveMethod
from symerge.adaptive.experts import ExpertCache
from symerge.adaptive.merged_encoder import MergedEncoder, numbered_block
from symerge.adaptive.objectives import FILTER_RULES, LABEL_TYPES, LOSSES, LossTerm, l1_loss, resolve_loss, self_label_loss
from symerge.adaptive.registry import one_of, positive, register_adaptive
from symerge.batching import Inputs
from symerge.errors import ValidationError

HEAD_INITS = ("expert", "random")
TASK_LAYER_SYNTAX = "'head', 'block:<module path>' or 'blocks:<module path>,<module path>,...'"


@dataclass(frozen=True)
class TaskLayer:
    """A parsed `task_layer`: the head, one block, or a group of blocks (module paths, no trailing dots)."""

    kind: str  # "head" | "block" | "blocks"
    paths: tuple[str, ...] = ()

    @property
    def is_head(self) -> bool:
        return self.kind == "head"


def parse_task_layer(task_layer: str) -> TaskLayer:
    """Syntax only (checked before anything loads); which tensors it takes is `select_task_layer_keys`."""
    if task_layer == "head":
        return TaskLayer("head")
    kind, _, rest = task_layer.partition(":")
    if kind in ("block", "blocks") and rest:
        paths = tuple(p.strip().rstrip(".") for p in rest.split(",")) if kind == "blocks" else (rest.rstrip("."),)
        empty = [p for p in paths if not p]
        if kind == "block" and "," in rest:
            raise ValidationError(f"task_layer '{task_layer}': 'block:' takes one module path; use 'blocks:' for a group")
        if not empty and len(set(paths)) == len(paths):
            return TaskLayer(kind, paths)
    raise ValidationError(f"task_layer must be {TASK_LAYER_SYNTAX} (distinct, non-empty paths), got '{task_layer}'")


def in_module(key: str, path: str) -> bool:
    """Whether tensor `key` belongs to module `path` (a whole-name prefix: 'layer.1' holds 'layer.1.w', not 'layer.10.w')."""
    return key == path or key.startswith(path + ".")


def select_task_layer_keys(keys: list[str], layer: TaskLayer, spelled: str = "") -> list[str]:
    """The encoder tensors (in `keys` order) that `layer` makes task-specific; [] for the head.

    Every path must select something; a single "block:" path may not span several numbered blocks (it would
    silently train far more than one layer)."""
    if layer.is_head:
        return []
    name = spelled or f"{layer.kind}:{','.join(layer.paths)}"
    for path in layer.paths:
        if not any(in_module(k, path) for k in keys):
            raise ValidationError(f"task_layer '{name}': no encoder tensor belongs to module '{path}'")
    chosen = [k for k in keys if any(in_module(k, p) for p in layer.paths)]
    if layer.kind == "block":
        blocks = list(dict.fromkeys(b.rstrip(".") for b in map(numbered_block, chosen) if b is not None))
        if len(blocks) > 1:
            raise ValidationError(
                f"task_layer '{name}' selects {len(blocks)} numbered blocks ({', '.join(blocks)}), not one; name one "
                f"block, or train them together with 'blocks:{','.join(blocks)}'")
    return chosen


def check_task_layer(value: str) -> None:
    parse_task_layer(value)


def trains_coefficients_only(options: Mapping[str, Any]) -> bool:
    """SyMerge with the layer frozen trains λ alone (so it gets the regime's coefficient-only learning rate)."""
    return options.get("train_layer", True) is False


def reinitialised(head: nn.Module, seed: int, task: str) -> dict[str, Tensor]:
    """A freshly initialised copy of `head`'s state (each submodule's own `reset_parameters`, on the CPU with its
    own seed, so the result is the same on every device and leaves the global RNG alone)."""
    fresh = copy.deepcopy(head).cpu()
    resettable = [m for m in fresh.modules() if callable(getattr(m, "reset_parameters", None))]
    if not resettable:
        raise ValidationError(f"head_init='random': the head of task '{task}' ({type(head).__name__}) has no "
                              "reset_parameters() to re-initialise it with")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in resettable:
            module.reset_parameters()
    return fresh.state_dict()


def head_seed(base: int, index: int) -> int:
    """Per-task seed derived from the trainer seed (distinct per task, stable across runs)."""
    return (base * 1_000_003 + index + 1) % (2**63 - 1)


# The paper filters self-labels by confidence in the vision regime only (App. A.1): NLP and dense run unfiltered.
REGIME_OPTIONS = {"nlp": {"filter_rule": "none"}, "dense": {"filter_rule": "none"}}


@register_adaptive("symerge", granularity="tensor", coefficients_only=trains_coefficients_only, checks={
    "filter_rule": one_of(FILTER_RULES), "labels": one_of(LABEL_TYPES), "loss": one_of(LOSSES),
    "temperature": positive, "task_layer": check_task_layer, "head_init": one_of(HEAD_INITS),
}, regime_options=REGIME_OPTIONS)
class SyMerge(AdaptiveMethod):

    def __init__(
        self,
        merged: MergedEncoder,
        heads: dict[str, nn.Module],
        task_layer: str = "head",
        filter_rule: str = "code",
        loss: str | None = None,
        labels: str | None = None,
        temperature: float = 1.0,
        block_init_coef: float = 0.3,
        train_coefficients: bool = True,
        train_layer: bool = True,
        head_init: str = "expert",
        **kwargs: Any,
    ):
        layer = parse_task_layer(task_layer)
        self.check_switches(layer, train_coefficients, train_layer, head_init)
        super().__init__(merged, heads, **kwargs)
        self.filter_rule, self.temperature = filter_rule, temperature
        self.loss = resolve_loss(loss, labels)
        self.task_layer = layer
        self.train_layer = train_layer
        merged.lambdas.requires_grad_(train_coefficients)
        self.block_keys = select_task_layer_keys(list(merged.keys), layer, task_layer)
        self.blocks = nn.ModuleDict()
        if layer.is_head:
            if head_init == "random":
                base = torch.initial_seed()  # build_trainer seeds torch with the trainer seed just before this
                for index, task in enumerate(self.tasks):
                    self.head(task).load_state_dict(reinitialised(self.head(task), head_seed(base, index), task))
            for head in self.heads.values():
                head.requires_grad_(train_layer)
        else:
            with torch.no_grad():
                ta = merged.scaled_params(torch.full((len(self.tasks),), block_init_coef))
            for task in self.tasks:
                self.blocks[self.slot(task)] = nn.ParameterList(
                    [nn.Parameter(ta[k].detach().clone()) for k in self.block_keys]
                )

    @staticmethod
    def check_switches(layer: TaskLayer, train_coefficients: bool, train_layer: bool, head_init: str) -> None:
        """Combinations that would train nothing, or freeze a layer that was never a trained model's."""
        if not (train_coefficients or train_layer):
            raise ValidationError("train_coefficients=False together with train_layer=False trains nothing; "
                                  "turn one of them on")
        if head_init not in HEAD_INITS:
            raise ValidationError(f"head_init must be one of {list(HEAD_INITS)}, got '{head_init}'")
        if not layer.is_head and not train_layer:
            raise ValidationError("train_layer=False needs task_layer='head' (a frozen per-task block would stay at "
                                  "its task-arithmetic initialisation)")
        if head_init == "random" and not (layer.is_head and train_layer):
            raise ValidationError("head_init='random' needs task_layer='head' and train_layer=True (a random head "
                                  "that never trains predicts nothing)")

    def layer_parameters(self, task: str | None = None) -> list[nn.Parameter]:
        """The task-specific layer's tensors (one task's, or every task's); [] when the layer is frozen."""
        if not self.train_layer:
            return []
        if self.task_layer.is_head:
            return list(self.head(task).parameters() if task is not None else self.heads.parameters())
        return list(self.blocks[self.slot(task)].parameters() if task is not None else self.blocks.parameters())

    def param_groups(self, lr: float, layer_lr: float) -> list[dict[str, Any]]:
        groups = []
        if self.merged.lambdas.requires_grad:
            groups.append({"params": [self.merged.lambdas], "lr": lr})
        if self.train_layer:
            groups.append({"params": self.layer_parameters(), "lr": layer_lr})
        return groups

    def step_parameters(self, task: str) -> list[nn.Parameter]:
        shared = [self.merged.lambdas] if self.merged.lambdas.requires_grad else []
        return shared + self.layer_parameters(task)

    def encoder_overrides(self, task: str) -> dict[str, Tensor]:
        if self.task_layer.is_head:
            return {}
        return dict(zip(self.block_keys, self.blocks[self.slot(task)]))

    def task_loss(self, task: str, inputs: Inputs, index: Tensor, cache: ExpertCache) -> LossTerm | None:
        output = self.task_output(task, inputs)
        target = cache.batch("outputs", task, index, output.device)
        if self.task_kinds[task] == "regression":
            return l1_loss(output, target)
        return self_label_loss(output, target, self.filter_rule, temperature=self.temperature, loss=self.loss)
