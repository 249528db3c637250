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
    heads, experts, adapt, test, test_y = {}, {}, {}, {}, {}
    for k in range(num_tasks):
        name = f"task{k}"
        x, y, _ = make_task(seed * 100 + k, n, dim_in, classes)
        enc = copy.deepcopy(pretrained)
        torch.manual_seed(seed * 100 + k)
        head = nn.Linear(32, classes)
        finetune(enc, head, x[:n], y[:n], steps, seed * 100 + k)
        heads[name] = head.requires_grad_(False)
        experts[name] = {kk: v.detach().clone() for kk, v in enc.state_dict().items()}
        adapt[name] = x[n : 2 * n]
        test[name], test_y[name] = x[2 * n :], y[2 * n :]
    return ToyProblem(pretrained, heads, experts, adapt, test, test_y)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


# Data-parallel tests: a global batch of 33 (uneven over 2 ranks) and options where every method learns something.
FAST_DISTRIBUTED = dict(steps=5, batch_size=33, progress=False, lr=1e-2, layer_lr=1e-2, seed=1)


def distributed_options(method: str) -> dict:
    return {"surgery": {"rank": 4}, "symerge-block": {"task_layer": "block:layer2."}}.get(method, {})
