"""The ablation studies (ablation, losses, teacher, init) end to end on a tiny benchmark with numbered encoder blocks,
and the self-supervised loss registry they compare, each loss against its formula written out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from symerge.adaptive.objectives import LOSSES, self_label_loss
from symerge.errors import ValidationError
from symerge.evaluation.metrics import mean, normalized
from symerge.studies.ablation import COMPONENTS, block_thirds, check_block_lr, lambda_sparsity, layer_variants, numbered_blocks
from symerge.studies.base import StudyContext, Variant
from symerge.studies.losses import ground_truth_cache, one_hot_logits, true_outputs
from symerge.suites.runner import AdaptSettings, Benchmark, expert_cache_for, primary_scores, static_result
from symerge.suites.tasks import TaskData
from toy import finetune, make_task

# --- the loss registry: each loss against its formula ------------------------------------------------------------------


def softmax_rows(z: torch.Tensor) -> list[list[float]]:
    out = []
    for row in z.tolist():
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        out.append([e / sum(exps) for e in exps])
    return out


def brute(name: str, m: torch.Tensor, e: torch.Tensor, t: float) -> float:
    """The loss written out element by element (means over samples, or over logit entries for l1 / smooth_l1 / l2)."""
    rows_m, rows_e = m.tolist(), e.tolist()
    n, c = m.shape
    if name == "ce":
        p = softmax_rows(m)
        return sum(-math.log(p[i][max(range(c), key=lambda j: rows_e[i][j])]) for i in range(n)) / n
    if name in ("kl", "js"):
        p, q = softmax_rows(m / t), softmax_rows(e / t)
        if name == "kl":
            per = [sum(q[i][j] * math.log(q[i][j] / p[i][j]) for j in range(c)) for i in range(n)]
        else:
            mix = [[(p[i][j] + q[i][j]) / 2 for j in range(c)] for i in range(n)]
            per = [0.5 * sum(p[i][j] * math.log(p[i][j] / mix[i][j]) for j in range(c))
                   + 0.5 * sum(q[i][j] * math.log(q[i][j] / mix[i][j]) for j in range(c)) for i in range(n)]
        return t * t * sum(per) / n
    if name == "entropy":
        p = softmax_rows(m)
        return sum(-sum(v * math.log(v) for v in row) for row in p) / n
    diffs = [a - b for ra, rb in zip(rows_m, rows_e) for a, b in zip(ra, rb)]
    if name == "l1":
        return sum(abs(d) for d in diffs) / len(diffs)
    if name == "smooth_l1":
        return sum(0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs) / len(diffs)
    if name == "l2":
        return sum(d * d for d in diffs) / len(diffs)
    if name == "cosine":
        dots = [sum(a * b for a, b in zip(ra, rb)) / math.sqrt(sum(a * a for a in ra) * sum(b * b for b in rb))
                for ra, rb in zip(rows_m, rows_e)]
        return sum(1 - d for d in dots) / n
    raise KeyError(f"no hand-written formula for loss '{name}'")


UNITS_PER_ROW = {"l1": 5, "smooth_l1": 5, "l2": 5}  # element-mean losses average over every logit entry (C = 5)


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_equals_its_formula(name):
    gen = torch.Generator().manual_seed(3)
    merged, teacher = 2 * torch.randn(6, 5, generator=gen), 2 * torch.randn(6, 5, generator=gen)
    temperature = 2.0 if name in ("kl", "js") else 1.0
    term = self_label_loss(merged.double(), teacher.double(), "none", temperature=temperature, loss=name)
    assert float(term.value) == pytest.approx(brute(name, merged.double(), teacher.double(), temperature), rel=1e-5)
    assert term.units == 6 * UNITS_PER_ROW.get(name, 1)


@pytest.mark.parametrize("name", LOSSES)
def test_dense_maps_are_per_pixel_rows(name):
    gen = torch.Generator().manual_seed(4)
    merged, teacher = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)
    dense = self_label_loss(merged, teacher, "none", loss=name)
    flat = self_label_loss(merged.movedim(1, -1).reshape(-1, 3), teacher.movedim(1, -1).reshape(-1, 3), "none", loss=name)
    torch.testing.assert_close(dense.value, flat.value)


def test_the_filter_selects_samples_for_teacher_losses_only():
    # sample 1 (merged more confident and disagreeing) is dropped by the "code" rule
    merged = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]]))
    teacher = torch.log(torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]]))
    kept = [0, 2, 3]
    for name in ("l2", "js", "cosine"):
        filtered = self_label_loss(merged, teacher, "code", loss=name)
        torch.testing.assert_close(filtered.value, self_label_loss(merged[kept], teacher[kept], "none", loss=name).value)
    entropy = self_label_loss(merged, teacher, "code", loss="entropy")
    assert entropy.units == 4
    assert float(entropy.value) == pytest.approx(brute("entropy", merged, teacher, 1.0), rel=1e-6)


def test_labels_is_an_alias_of_loss():
    gen = torch.Generator().manual_seed(5)
    merged, teacher = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    soft = self_label_loss(merged, teacher, "none", labels="soft")
    assert torch.equal(soft.value, self_label_loss(merged, teacher, "none", loss="kl").value)
    assert torch.equal(self_label_loss(merged, teacher, "none", labels="hard").value,
                       self_label_loss(merged, teacher, "none").value)
    with pytest.raises(ValidationError, match="labels='soft' means loss='kl', which contradicts loss='ce'"):
        self_label_loss(merged, teacher, "none", labels="soft", loss="ce")
    with pytest.raises(ValidationError, match="loss must be one of"):
        self_label_loss(merged, teacher, "none", loss="hinge")


def test_lambda_sparsity_counts_entries_below_the_threshold():
    lam = torch.tensor([[0.0, 5e-6, 0.3], [1e-5, 0.2, 0.0]])
    assert lambda_sparsity(lam) == 3 / 6
    with pytest.raises(ValidationError, match="learned coefficients"):
        lambda_sparsity(None)


def test_numbered_blocks_in_block_order_and_thirds():
    keys = [f"encoder.layer.{i}.w" for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)] + ["embeddings.w", "pooler.w"]
    blocks = numbered_blocks(keys)
    assert blocks == [f"encoder.layer.{i}" for i in range(12)]
    assert block_thirds(blocks) == {"early": blocks[0:4], "middle": blocks[4:8], "late": blocks[8:12]}
    assert block_thirds(blocks[:2]) == {} and numbered_blocks(["layer1.weight", "layer2.bias"]) == []


# --- a tiny benchmark with numbered blocks ---------------------------------------------------------------------------------
BLOCKS, DIM, HIDDEN, CLASSES, N = 6, 16, 16, 4, 96


class NumberedEncoder(nn.Module):
    """A stem and six residual blocks named `layer.N.*` (numbered blocks, as in BERT's `encoder.layer.N`)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(DIM, HIDDEN)
        self.layer = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(BLOCKS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for block in self.layer:
            h = h + torch.relu(block(h))
        return h


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    torch.manual_seed(0)
    encoder = NumberedEncoder()
    heads, experts, tasks = {}, {}, {}
    for k in range(3):
        name = f"task{k}"
        x, y, _ = make_task(100 + k, N, DIM, CLASSES)
        expert = copy.deepcopy(encoder)
        torch.manual_seed(k)
        head = nn.Linear(HIDDEN, CLASSES)
        finetune(expert, head, x[:N], y[:N], 120, k)
        heads[name] = head.requires_grad_(False)
        experts[name] = {key: v.detach().clone() for key, v in expert.state_dict().items()}
        tasks[name] = TaskData(name, [str(c) for c in range(CLASSES)], adapt=x[N:2 * N], test=x[2 * N:],
                               test_labels=y[2 * N:], val=x[:32], val_labels=y[:32], adapt_labels=y[N:2 * N])
    return Benchmark(encoder, heads, experts, tasks)


def context(bench: Benchmark, steps: int = 6, **settings) -> StudyContext:
    adapt = AdaptSettings(steps=steps, batch_size=32, curve=[], progress=False, seed=0, **settings)
    individual = static_result("individual", bench, bench.task_vectors(), {})
    return StudyContext(suite="toy", bench=bench, settings=adapt, protocol="held-out", seed=0, quick=False,
                        reference=primary_scores(individual, bench, "cpu"), progress=False, log=lambda _: None)


def check_output(output, tmp_path, figures: set[str]) -> None:
    """Common to every study: a flat float headline, a table with the paper's numbers, and the figures drawn."""
    headline = output.data["headline"]
    assert headline and all(isinstance(k, str) and isinstance(v, float) for k, v in headline.items())
    assert output.markdown.count("| variant |") >= 1 or output.markdown.startswith("| loss |")
    assert "Paper" in output.markdown
    assert set(output.figures) == figures
    for name, draw in output.figures.items():
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_study(bench, tmp_path):
    from symerge.studies.ablation import ablation

    # λ starts near 0 with a large λ rate, so λ-only training pushes some coefficients onto the clamp at 0
    ctx = context(bench, lr=0.05, method_options={"symerge": {"init": 0.02}})
    output = ablation(ctx)
    data = output.data
    blocks = [f"layer.{i}" for i in range(BLOCKS)]
    assert data["blocks"] == blocks
    assert [r["label"] for r in data["components"]] == ["coef-only", "layer-only", "joint (SyMerge)"]
    assert [r["label"] for r in data["layers"]] == (
        ["head"] + [f"block {b}" for b in blocks] + ["early (2 blocks)", "middle (2 blocks)", "late (2 blocks)"])
    head, joint = data["layers"][0], data["components"][2]
    assert head["per_task"] == joint["per_task"]  # the head row is the joint run
    assert len({tuple(r["per_task"].values()) for r in data["layers"]}) > 1
    # sparsity: the study's share equals a count over an independent rerun of the λ-only variant
    rerun = ctx.run_variant(COMPONENTS[0]).result.lambdas
    below = sum(1 for v in rerun.flatten().tolist() if v < 1e-5)
    assert data["lambda_sparsity"]["coef-only"] == below / rerun.numel()
    assert 0 < data["lambda_sparsity"]["coef-only"] < 1
    assert 0 <= data["lambda_sparsity"]["joint (SyMerge)"] <= 1
    assert data["headline"]["λ<1e-5 coef-only"] == data["lambda_sparsity"]["coef-only"]
    check_output(output, tmp_path, {"ablation_components.png", "ablation_sparsity.png", "ablation_layers.png"})


def test_ground_truth_cache_holds_the_true_labels(bench):
    ctx = context(bench)
    gt = ground_truth_cache(ctx)
    for task, data in bench.tasks.items():
        assert torch.equal(gt.outputs[task].argmax(dim=1), data.adapt_labels)
        assert torch.equal(gt.outputs[task].sum(dim=1), torch.ones(N))
    with pytest.raises(ValidationError, match=r"must lie in \[0, 3\)"):
        one_hot_logits(torch.tensor([0, 3]), 3, "t")
    segmentation = torch.tensor([[[0, 2], [1, 1]]])  # [N, H, W] -> one-hot [N, C, H, W]
    assert torch.equal(one_hot_logits(segmentation, 3, "seg").argmax(dim=1), segmentation)
    depth = torch.rand(2, 1, 2, 2)  # regression: the target itself
    assert torch.equal(true_outputs(depth.reshape(2, 4), torch.zeros(2, 1, 2, 2), "regression", "depth"), depth)


def test_losses_study(bench, tmp_path):
    from symerge.studies.losses import losses

    # the older `labels` spelling set by a suite (the dense suite's soft labels) must not contradict each row's loss
    output = losses(context(bench, steps=15, method_options={"symerge": {"labels": "soft"}}))
    table = output.data["table"]
    assert list(table) == ["coef-only", "classifier+coef"]
    for row, values in table.items():
        assert list(values) == [*LOSSES, "GT"]
        assert values["GT"] >= min(v for k, v in values.items() if k != "GT"), row
    assert len(output.data["rows"]) == 2 * (len(LOSSES) + 1)
    check_output(output, tmp_path, {"losses.png"})


def test_teacher_study(bench, tmp_path):
    from symerge.studies.teacher import teacher

    ctx = context(bench)
    output = teacher(ctx)
    data = output.data
    assert [r["label"] for r in data["rows"]] == ["α=0.25", "α=0.5", "α=0.75", "α=1"]
    assert data["teachers"]["α=1"] == ctx.reference  # the α = 1 teacher is the expert itself
    assert data["teachers"]["α=0.25"] != ctx.reference
    # α = 1 reproduces plain SyMerge on the runner's own expert pass exactly
    plain_cache = expert_cache_for(bench, ctx.task_vectors(), ctx.adapt_inputs(), ctx.settings, False)
    plain = context(bench).run_variant(Variant("symerge"), cache=plain_cache)
    alpha_one = data["rows"][-1]
    assert alpha_one["per_task"] == plain.per_task and alpha_one["average"] == plain.average
    assert data["rows"][0]["per_task"] != plain.per_task or data["rows"][0]["average"] != plain.average
    check_output(output, tmp_path, {"teacher.png"})


def test_init_study(bench, tmp_path):
    from symerge.studies.init import init

    output = init(context(bench))
    labels = [r["label"] for r in output.data["rows"]]
    assert labels == ["expert head init", "random head init"]
    assert output.data["headline"]["expert head init"] != output.data["headline"]["random head init"]
    check_output(output, tmp_path, {"init.png"})


def test_importing_the_package_registers_these_studies():
    from symerge.studies import get_study

    for name, table in [("ablation", "Table 5"), ("losses", "Fig. C"), ("teacher", "Fig. 6a"), ("init", "Fig. 6b")]:
        assert table in get_study(name).reproduces and get_study(name).summary


def test_block_rows_take_their_own_learning_rate():
    """The suite's task-layer lr is tuned for heads; `block_lr` gives the block rows theirs, heads keep the suite's."""
    blocks = ["enc.layer.0", "enc.layer.1", "enc.layer.2"]
    assert all(v.trainer == {} for v in layer_variants(blocks))
    rows = layer_variants(blocks, 1e-4)
    assert len(rows) == 6 and all(v.trainer == {"layer_lr": 1e-4} for v in rows)
    assert rows[3].options["task_layer"] == "blocks:enc.layer.0"
    assert check_block_lr(1e-4) == 1e-4
    for bad in (0, -1e-3, float("nan"), True, "1e-4"):
        with pytest.raises(ValidationError, match="block_lr"):
            check_block_lr(bad)


def test_losses_study_runs_the_chosen_subset(bench, tmp_path):
    """`--option losses=[...] --option rows=[...]`: only those rows run; the table marks the rest as not run."""
    from symerge.studies.base import STUDIES
    from symerge.studies.losses import losses

    check = STUDIES["losses"].options
    ctx = context(bench, steps=4)
    ctx.options = {"losses": check["losses"](["l1", "ce"]), "rows": check["rows"](["classifier+coef"])}
    output = losses(ctx)
    assert output.data["table"] == {"classifier+coef": {k: output.data["table"]["classifier+coef"][k]
                                                        for k in ("ce", "l1", "GT")}}
    assert [r["label"] for r in output.data["rows"]] == ["classifier+coef / ce", "classifier+coef / l1",
                                                         "classifier+coef / GT"]
    assert "| ce | – |" in output.markdown and "| entropy |" not in output.markdown
    for bad, message in [("l3", "unknown 'l3'"), ([], "non-empty list"), ("ce", "non-empty list")]:
        with pytest.raises(ValidationError, match=message):
            check["losses"]([bad] if bad == "l3" else bad)
    check_output(output, tmp_path, {"losses.png"})


def test_tuning_study_curves_match_separate_runs(bench, tmp_path):
    """Each curve point equals a separate run stopped at that step; the bar is task arithmetic scored directly."""
    from symerge.studies.base import STUDIES
    from symerge.studies.tuning import tuning

    check = STUDIES["tuning"].options
    ctx = context(bench)
    ctx.options = {"method": check["method"]("adamerging"), "lrs": check["lrs"]([1e-3, 0.1]), "steps": 4,
                   "curve": check["curve"]([2]), "trainer": check["trainer"]({"update": "summed"})}
    output = tuning(ctx)
    curves = output.data["curves"]
    assert output.data["marks"] == [2, 4] and list(curves) == ["lr=0.001", "lr=0.1"]
    for lr in (1e-3, 0.1):
        points = curves[f"lr={lr:g}"]
        assert [p["iterations"] for p in points] == [2, 4]
        for point in points:
            alone = ctx.run_variant(Variant("alone", method="adamerging",
                                            trainer={"lr": lr, "steps": int(point["iterations"]), "update": "summed"}))
            assert point["normalized_average"] == alone.normalized_average
    assert curves["lr=0.001"][-1]["normalized_average"] != curves["lr=0.1"][-1]["normalized_average"]
    ta = ctx.normalized(ctx.score(static_result("task_arithmetic", bench, ctx.task_vectors(), {})))
    assert output.data["headline"]["task_arithmetic"] == ta
    assert "| task arithmetic |" in output.markdown
    for name, draw in output.figures.items():
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuning_on_the_validation_split_scores_it_against_the_experts_validation_scores(bench):
    """split=val: every curve point and the task-arithmetic bar are scored on the labeled validation split, each
    normalized by the experts' own validation scores (computed here directly), never by their test scores."""
    from symerge.studies.base import STUDIES
    from symerge.studies.tuning import tuning

    check = STUDIES["tuning"].options
    ctx = context(bench)
    ctx.options = {"method": "adamerging", "lrs": [0.1], "steps": 4, "curve": [2], "split": check["split"]("val")}
    output = tuning(ctx)
    experts_val = primary_scores(static_result("individual", bench, ctx.task_vectors(), {}), bench, "cpu", "val")
    ta_val = primary_scores(static_result("task_arithmetic", bench, ctx.task_vectors(), {}), bench, "cpu", "val")
    assert output.data["split"] == "val" and "labeled validation split" in output.markdown
    assert output.data["headline"]["task_arithmetic"] == pytest.approx(mean(normalized(ta_val, experts_val)))
    _result, _points, per_task, _seconds = ctx.adapt(Variant("alone", method="adamerging",
                                                             trainer={"lr": 0.1, "steps": 4}), None, [], split="val")
    final = output.data["curves"]["lr=0.1"][-1]["normalized_average"]
    assert final == pytest.approx(mean(normalized(per_task, experts_val)))
    assert final != ctx.run_variant(Variant("test", method="adamerging", trainer={"lr": 0.1, "steps": 4})).normalized_average


@pytest.mark.parametrize("name, value, message", [
    ("split", "train", "'split' must be one of"),
    ("split", ["val"], "'split' must be one of"),
    ("method", "nope", "unknown adaptive method 'nope'"),
    ("lrs", [], "non-empty list"),
    ("lrs", [1e-3, -1.0], "'lrs' must be a positive number"),
    ("grid", {"init_lambda": 0.3}, "must list at least one value"),
    ("trainer", {"lr": 1e-3}, "set learning rates with 'lrs'"),
    ("trainer", {"update": "bogus"}, "study option 'trainer'"),
    ("curve", [0], "must be an integer ≥ 1"),
])
def test_tuning_options_are_checked(name, value, message):
    from symerge.studies.base import STUDIES

    with pytest.raises(ValidationError, match=message):
        STUDIES["tuning"].options[name](value)


def test_tuning_grid_values_go_through_the_method_checks(bench):
    from symerge.studies.tuning import tuning

    ctx = context(bench)
    ctx.options = {"method": "wemoe", "grid": {"router_hidden_layers": [1, -1]}}
    with pytest.raises(ValidationError, match="wemoe option 'router_hidden_layers'"):
        tuning(ctx)


def test_tuning_logs_each_curve_point_as_it_is_scored(bench):
    ctx = context(bench)
    lines: list[str] = []
    ctx.log = lines.append
    points = ctx.run_curve(Variant("run", method="adamerging", trainer={"steps": 4}), [2, 4])
    assert [int(p["iterations"]) for p in points] == [2, 4]
    assert [line.split("@")[1].split(":")[0].strip() for line in lines] == ["2", "4"]
    assert lines[0].endswith(f"{points[0]['normalized_average']:.4f}")
