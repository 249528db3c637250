"""A tiny synthetic multi-task problem with experts fine-tuned in the test (seconds on CPU)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from symerge.taskvectors import TaskVectors


class ToyEncoder(nn.Module):
    def __init__(self, dim_in: int = 16, hidden: int = 32):
        super().__init__()
        self.layer1 = nn.Linear(dim_in, hidden)
        self.layer2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.layer2(torch.relu(self.layer1(x))))


@dataclass
class ToyProblem:
    encoder: nn.Module  # pretrained weights
    heads: dict[str, nn.Module]
    experts: dict[str, dict[str, Tensor]]  # encoder state per task
    adapt_inputs: dict[str, Tensor]
    test_inputs: dict[str, Tensor]
    test_labels: dict[str, Tensor]

    def task_vectors(self) -> TaskVectors:
        return TaskVectors.from_state_dicts(self.encoder.state_dict(), self.experts)


def make_task(seed: int, n: int, dim_in: int, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim_in, generator=g) * 1.5
    weight = torch.randn(classes, dim_in, generator=g)
    x = torch.randn(3 * n, dim_in, generator=g) + mean
    y = (x - mean) @ weight.T
    return x, y.argmax(dim=1), mean


def finetune(encoder: nn.Module, head: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(head(encoder(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_toy_problem(num_tasks: int = 3, n: int = 256, classes: int = 4, steps: int = 300, seed: int = 0) -> ToyProblem:
    dim_in = 16
    torch.manual_seed(seed)
    pretrained = ToyEncoder(dim_in)
    problem = ToyProblem(pretrained, {}, {}, {}, {}, {})
    for k in range(num_tasks):
        x, y, _ = make_task(seed * 100 + k, n, dim_in, classes)
        torch.manual_seed(seed * 100 + k)
        add_expert(problem, f"task{k}", nn.Linear(32, classes), x, y, n, steps, seed * 100 + k)
    return problem


def add_expert(problem: ToyProblem, name: str, head: nn.Module, x: Tensor, y: Tensor, n: int, steps: int,
               seed: int) -> None:
    """Fine-tune a copy of the pretrained encoder with `head` on the first n samples (the expert of `name`); the
    next n are its adaptation inputs, the rest its test set."""
    enc = copy.deepcopy(problem.encoder)
    finetune(enc, head, x[:n], y[:n], steps, seed)
    problem.heads[name] = head.requires_grad_(False)
    problem.experts[name] = {kk: v.detach().clone() for kk, v in enc.state_dict().items()}
    problem.adapt_inputs[name] = x[n : 2 * n]
    problem.test_inputs[name], problem.test_labels[name] = x[2 * n :], y[2 * n :]


def perturbed_experts(encoder: nn.Module, tasks: tuple[str, ...], scale: float) -> dict[str, dict[str, Tensor]]:
    """Per task, the encoder's state with every parameter moved by scale × N(0, 1) noise (random task vectors)."""
    experts = {}
    for task in tasks:
        expert = copy.deepcopy(encoder)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(scale * torch.randn_like(p))
        experts[task] = expert.state_dict()
    return experts


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


# Data-parallel tests: a global batch of 33 (uneven over 2 ranks) and options where every method learns something.
FAST_DISTRIBUTED = dict(steps=5, batch_size=33, progress=False, lr=1e-2, layer_lr=1e-2, seed=1)


def distributed_options(method: str) -> dict:
    return {"surgery": {"rank": 4}, "symerge-block": {"task_layer": "block:layer2."}}.get(method, {})


# --- a problem where per-input routing matters (WEMoE's quality test) -----------------------------------------------
class NormedToyEncoder(nn.Module):
    """Two Linear layers like `ToyEncoder`, then a LayerNorm without parameters: the features have a fixed scale,
    so no merge can make the heads more confident by making the features larger."""

    def __init__(self, dim_in: int = 16, hidden: int = 32):
        super().__init__()
        self.layer1 = nn.Linear(dim_in, hidden)
        self.layer2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.layer2(torch.relu(self.layer1(x))))


def make_margin_task(g: torch.Generator, mean: Tensor, count: int, classes: int, gap: float) -> tuple[Tensor, Tensor]:
    """`count` inputs mean + z (z ~ N(0, I)) labelled by a random linear rule argmax_c w_c·z, keeping only those
    whose best score beats the second by more than `gap`: a clean task an expert can be confident on everywhere."""
    weight = torch.randn(classes, mean.numel(), generator=g)
    kept: list[Tensor] = []
    while sum(len(z) for z in kept) < count:
        z = torch.randn(8 * count, mean.numel(), generator=g)
        top = (z @ weight.T).topk(2, dim=1).values
        kept.append(z[top[:, 0] - top[:, 1] > gap])
    z = torch.cat(kept)[:count]
    return z + mean, (z @ weight.T).argmax(dim=1)


def build_routing_problem(num_tasks: int = 3, n: int = 256, classes: int = 4, steps: int = 300,
                          separation: float = 4.0, gap: float = 2.0, seed: int = 0) -> ToyProblem:
    """A multi-task problem in the spirit of WEMoE's setting (Tang et al., ICML 2024), where routing each input to
    its own expert is both possible and what entropy minimisation rewards:

    - each task's inputs lie around its own mean, `separation` apart along orthonormal directions (the routers can
      tell the tasks apart from a unit's input), and each is labelled by its own random linear rule of the offset
      from that mean;
    - every expert fine-tunes the whole encoder (and its head) from one random "pretrained" encoder, at a high
      learning rate: large task vectors that disagree, so task arithmetic suffers interference (≈0.73 accuracy
      against the experts' ≈0.97, over 16 seeds);
    - the encoder ends in a LayerNorm without parameters (`NormedToyEncoder`): scaling task vectors up cannot
      inflate the logits, which on `build_toy_problem` lets entropy fall without routing anything;
    - inputs within `gap` of a class boundary are left out (`make_margin_task`), so each expert is confident on
      almost all of its task's inputs: routing every input to its own expert is where the entropy is lowest (mean
      entropy 0.04-0.07 over 16 seeds; 0.40-0.53 for task arithmetic at 0.3; the own expert's task vector scaled
      by 1.5 gives about the same, 0.04-0.07, and by 2 more, 0.06-0.09).
    """
    dim_in, hidden = 16, 32
    torch.manual_seed(seed)
    pretrained = NormedToyEncoder(dim_in, hidden)
    g = torch.Generator().manual_seed(seed + 1000)
    directions = torch.linalg.qr(torch.randn(dim_in, dim_in, generator=g))[0][:, :num_tasks].T
    problem = ToyProblem(pretrained, {}, {}, {}, {}, {})
    for k in range(num_tasks):
        x, y = make_margin_task(g, separation * directions[k], 3 * n, classes, gap)
        torch.manual_seed(seed * 100 + k)
        add_expert(problem, f"task{k}", nn.Linear(hidden, classes), x, y, n, steps, seed * 100 + k)
    return problem
