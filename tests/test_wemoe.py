"""WEMoE: task arithmetic at init, exact per-sample weights (Linear and Conv units) and router gradients, padding
invariance, quality on a synthetic problem where routing matters, resume, option errors, and how its results are
kept (not exported)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hf_tiny
from symerge.adaptive import TrainerConfig, adapt, build_trainer
from symerge.adaptive.finish import finish
from symerge.adaptive.wemoe_model import MixedLayer, RoutedInput, _PerSampleLinear, as_tokens
from symerge.errors import ValidationError
from symerge.merging import merge_task_vectors
from symerge.models.mobilenet import ConvBNReLU6, InvertedResidual, channels_last
from symerge.models.text import MeanPooledEncoder
from symerge.result import MergeResult
from symerge.taskvectors import TaskVectors
from toy import ToyEncoder, accuracy, build_routing_problem

FAST = dict(steps=3, batch_size=16, progress=False, lr=1e-3)


# --- small problems -------------------------------------------------------------------------------------------------
class Problem:
    """A pretrained encoder, perturbed experts (their task vectors), heads and inputs per task."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module], inputs: dict, scale: float = 0.05,
                 seed: int = 0, tv: TaskVectors | None = None):
        self.encoder, self.heads, self.inputs, self.tv = encoder, heads, inputs, tv
        if tv is None:  # experts: the pretrained parameters perturbed (buffers, e.g. BN statistics, kept)
            gen = torch.Generator().manual_seed(seed)
            trainable = {n for n, _ in encoder.named_parameters()}
            base = encoder.state_dict()
            experts = {t: {k: v + scale * torch.randn(v.shape, generator=gen) if k in trainable else v.clone()
                           for k, v in base.items()} for t in heads}
            self.tv = TaskVectors.from_state_dicts(base, experts, keys=sorted(trainable))

    def ta(self, coef: float = 0.3) -> MergeResult:
        return MergeResult("task_arithmetic", self.tv.tasks, self.encoder,
                           merge_task_vectors("task_arithmetic", self.tv, scaling_coef=coef), dict(self.heads))


def token_batch(n: int, seed: int, max_len: int = 10) -> dict[str, torch.Tensor]:
    """Random token ids with right padding (id 1) after a per-sample length."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (n,), generator=gen)
    ids = torch.randint(5, len(hf_tiny.VOCAB), (n, max_len), generator=gen)
    mask = (torch.arange(max_len) < lengths[:, None]).long()
    return {"input_ids": torch.where(mask.bool(), ids, torch.ones_like(ids)), "attention_mask": mask}


@pytest.fixture(scope="module")
def bert_problem() -> Problem:
    from transformers import BertModel

    torch.manual_seed(0)
    encoder = MeanPooledEncoder(BertModel(hf_tiny.config("bert"), add_pooling_layer=False).eval())
    heads = {"alpha": nn.Linear(32, 2), "beta": nn.Linear(32, 3)}
    return Problem(encoder, heads, {t: token_batch(24, seed=i) for i, t in enumerate(heads)})


class TinyMobileNet(nn.Module):
    """Stem, two inverted residuals (one strided, depthwise convs) and a last 1×1 conv, as MobileNetV2's `features`."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvBNReLU6(3, 8, stride=2), InvertedResidual(8, 8, 1, 2),
                                      InvertedResidual(8, 12, 2, 2), ConvBNReLU6(12, 16, kernel=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(channels_last(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def conv_problem() -> Problem:
    torch.manual_seed(1)
    encoder = TinyMobileNet().eval()
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    heads = {"a": nn.Linear(16, 3), "b": nn.Linear(16, 2), "c": nn.Linear(16, 4)}
    return Problem(encoder, heads, {t: torch.randn(12, 3, 16, 16) for t in heads}, scale=0.1)


def trainer_for(problem: Problem, config: dict | None = None, **options):
    return build_trainer("wemoe", problem.encoder, problem.heads, problem.tv, problem.inputs,
                         config=TrainerConfig(**(config or FAST)), **options)


def toy(toy_problem) -> Problem:
    return Problem(toy_problem.encoder, toy_problem.heads, toy_problem.adapt_inputs, tv=toy_problem.task_vectors())


def with_routing(model: nn.Module, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return model.forward_with_routing(**x) if isinstance(x, dict) else model.forward_with_routing(x)


def randomize_routers(model: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Input-dependent routing far from init_lambda (the FusionBench init is almost constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in [m.router for m in model.modules() if isinstance(m, RoutedInput)]:
            for p in router.parameters():
                p.copy_(std * torch.randn(p.shape, generator=gen) + (0.3 if p.dim() == 1 else 0.0))


def silence_routers(model: nn.Module) -> None:
    """Zero each router's output weight: routing is then exactly its output bias, init_lambda."""
    with torch.no_grad():
        for router in [m.router for m in model.modules() if isinstance(m, RoutedInput)]:
            router.net[-1].weight.zero_()


# --- 1. step 0 is task arithmetic -------------------------------------------------------------------------------
def test_at_init_wemoe_is_task_arithmetic(toy_problem, bert_problem):
    cases = [(toy(toy_problem), "task1", toy_problem.test_inputs["task1"][:40]),
             (bert_problem, "beta", token_batch(16, seed=9))]
    for problem, task, x in cases:
        expected = problem.ta(0.3).predict(task, x)
        free = finish(trainer_for(problem, router_hidden_layers=0))  # a free vector per unit: exactly init_lambda
        torch.testing.assert_close(free.predict(task, x), expected, atol=1e-5, rtol=1e-5)
        trainer = trainer_for(problem)
        fusionbench = finish(trainer).predict(task, x)  # N(0, 0.01²) router weights: routing ≈ init_lambda
        spread = max(float((r.detach() - 0.3).abs().max()) for r in with_routing(trainer.method.model, x)[1].values())
        print(f"\n{type(problem.encoder).__name__}: FusionBench init routing within ±{spread:.4f} of 0.3, logits "
              f"within {float((fusionbench - expected).abs().max()):.2e} of task arithmetic")
        assert spread < 0.05
        silence_routers(trainer.method.model)
        torch.testing.assert_close(finish(trainer).predict(task, x), expected, atol=1e-5, rtol=1e-5)
    assert finish(trainer).provenance["wemoe"]["units"] == ["body.encoder.layer.0.intermediate",
                                                            "body.encoder.layer.1.intermediate"]


# --- 2. exact per-sample computation -----------------------------------------------------------------------------
def reference(problem: Problem, model: nn.Module, routing: dict[str, torch.Tensor], samples: list) -> list:
    """Slow reference: each sample alone through the ORIGINAL encoder with its own merged weights (TA at 0.3, unit
    layers θ_pre + Σ_k r_k τ_k from the task vectors); each unit's routing recomputed from the input it really gets."""
    arch = copy.deepcopy(problem.encoder)
    ta = merge_task_vectors("task_arithmetic", problem.tv, scaling_coef=0.3)
    layers = {name.replace(".inner", ""): layer for name, layer in model.encoder.named_modules()
              if isinstance(layer, MixedLayer)}
    wrappers = {m.name: m for m in model.modules() if isinstance(m, RoutedInput)}
    outputs = []
    for b, sample in enumerate(samples):
        state = {**problem.encoder.state_dict(), **ta}
        for path, layer in layers.items():
            r = routing[model.units[layer.unit]][b]
            for part in ("weight", "bias"):
                key = f"{path}.{part}"
                if key in problem.tv.vectors:
                    state[key] = problem.tv.pretrained[key] + torch.einsum("k,k...->...", r, problem.tv.vectors[key])
        seen: dict[str, torch.Tensor] = {}
        hooks = [arch.get_submodule(u).register_forward_pre_hook(lambda _m, a, u=u: seen.__setitem__(u, a[0]))
                 for u in model.units]
        args, kwargs = ((), sample) if isinstance(sample, dict) else ((sample,), {})
        outputs.append(functional_call(arch, state, args, kwargs))
        for hook in hooks:
            hook.remove()
        for u, wrapper in wrappers.items():  # the router on the sample's own (unpadded) unit input
            recomputed = wrapper.router(as_tokens(seen[u], wrapper.channel_first), None)[0]
            torch.testing.assert_close(recomputed, routing[u][b], atol=1e-5, rtol=1e-5)
    return outputs


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_batched_per_sample_weights_equal_a_per_sample_reference(kind, bert_problem, conv_problem):
    problem = bert_problem if kind == "linear" else conv_problem
    model = trainer_for(problem).method.model
    randomize_routers(model)
    if kind == "linear":
        batch = token_batch(6, seed=3)
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # each sample alone, without padding
        samples = [{k: v[b : b + 1, : lengths[b]] for k, v in batch.items()} for b in range(6)]
        out, routing = model.forward_with_routing(**batch)
    else:
        batch = torch.randn(5, 3, 16, 16) + torch.linspace(-2, 2, 5).view(5, 1, 1, 1)  # images of unlike means
        samples = [batch[b : b + 1] for b in range(5)]
        out, routing = model.forward_with_routing(batch)
        assert model.units == ["features.1", "features.2"]  # stem and last 1×1 conv stay merged
    assert all(r.shape == (len(samples), len(problem.heads)) for r in routing.values())
    spread = min(float(r.detach().std(dim=0).max()) for r in routing.values())
    assert spread > 0.05, "routing must differ between samples for this test to mean anything"
    expected = torch.cat(reference(problem, model, routing, samples))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_per_sample_linear_gradients_match_autograd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    r = torch.randn(3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    pre = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    tau = torch.randn(2, 6, 5, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda a, b: _PerSampleLinear.apply(a, b, pre, tau), (x, r))


def test_router_gradients_of_the_entropy_match_finite_differences():
    """End to end on a float64 model (which adapts in float64, as for AdaMerging): the entropy of a task's head on
    the WEMoE output reaches every router parameter, with the gradient finite differences give."""
    torch.manual_seed(0)
    encoder = ToyEncoder().double()
    experts = {t: {k: v + 0.3 * torch.randn_like(v) for k, v in encoder.state_dict().items()} for t in "abc"}
    tv = TaskVectors.from_state_dicts(encoder.state_dict(), experts, dtype="float64")
    heads = {t: nn.Linear(32, 4).double() for t in "abc"}
    inputs = {t: torch.randn(16, 16, dtype=torch.float64) + i for i, t in enumerate("abc")}
    method = build_trainer("wemoe", encoder, heads, tv, inputs, config=TrainerConfig(**FAST)).method
    randomize_routers(method.model)
    assert all(p.dtype == torch.float64 for p in method.routers.parameters())
    x = inputs["b"]

    def loss() -> torch.Tensor:  # the method's objective, in float64 (`entropy_loss` computes it in float32)
        log_p = torch.log_softmax(method.task_output("b", x), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1).mean()

    with torch.no_grad():
        objective = method.task_loss("b", x, torch.arange(len(x)), None).value
        assert float(objective) == pytest.approx(float(loss()), rel=1e-6)
    loss().backward()
    for name, param in method.routers.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
        for flat in (0, param.numel() - 1):
            entry = param.data.view(-1)
            old = float(entry[flat])
            with torch.no_grad():
                entry[flat] = old + 1e-6
                plus = float(loss())
                entry[flat] = old - 1e-6
                minus = float(loss())
                entry[flat] = old
            numeric = (plus - minus) / 2e-6
            assert float(param.grad.view(-1)[flat]) == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, flat)


# --- 3. padding -------------------------------------------------------------------------------------------------
def test_predictions_do_not_depend_on_batch_padding(bert_problem):
    trainer = trainer_for(bert_problem)
    randomize_routers(trainer.method.model)
    result = finish(trainer)
    alone = {"input_ids": torch.tensor([[7, 9, 11, 13]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    padded = token_batch(3, seed=4, max_len=12)
    padded["input_ids"][0], padded["attention_mask"][0] = 1, 0
    padded["input_ids"][0, :4], padded["attention_mask"][0, :4] = alone["input_ids"][0], 1
    padded["attention_mask"][1] = 1  # another sample uses all 12 positions: sample 0 gets 8 padding tokens
    head = result.heads["alpha"]
    with torch.no_grad():
        single = head(result.encoder(**alone))
        batched = head(result.encoder(**padded))[:1]
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.predict("alpha", padded)[:1], single, atol=1e-5, rtol=1e-5)
    reduced = trainer_for(bert_problem, batch_reduce=True).method.model  # FusionBench's batch-averaged routing
    randomize_routers(reduced)
    with torch.no_grad():
        assert not torch.allclose(reduced(**padded)[:1], reduced(**alone), atol=1e-4)


# --- 4. quality ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def routing_problem():
    return build_routing_problem()


def test_wemoe_beats_task_arithmetic_on_a_routing_problem(routing_problem):
    """WEMoE with its defaults (init_lambda 0.3, 2-layer routers), 100 iterations at lr 1e-3, against task arithmetic
    at 0.3 and at its best λ on a grid scored on the test labels (a stronger baseline than validation-tuned TA).

    On `build_routing_problem` (its docstring: tasks in separate input regions, conflicting large task vectors,
    normalised features, margin-separated classes) entropy is lowest where each input runs through its own expert,
    and the routers learn to route there (printed: here each task's mean routing weights peak on its own expert at
    both units, in every seed; over 16 problem seeds in 40 of 48 runs). With input-independent routing (0 hidden
    router layers, or routers fed zeros) the same runs reach 0.71-0.72 and this test fails.
    Measured over 16 problem seeds × 3 training seeds: accuracy 0.92 on average (0.77-0.98) against TA's 0.73
    (0.61-0.81); WEMoE − TA(0.3) ≥ +0.10 and WEMoE − best-λ TA ≥ +0.08 in every run, and ≥ +0.04 against the
    best-λ TA with 50 or 200 iterations or lr 5e-4 or 3e-3. Here (problem seed 0) the margins are ≈ +0.22 against
    the best-λ TA, so the 0.05 asked for leaves room. Both design choices matter: without the LayerNorm WEMoE is no
    better than TA (−0.10 to +0.04, 24 runs); without the class margin one problem in 8 collapses a task onto one
    class (−0.09). AdaMerging (layer-wise λ, same objective) does not beat TA on this problem (−0.035 to +0.026,
    mean 0.000, 48 runs): no static merge resolves the conflict, per-input routing does. On `build_toy_problem`
    (unnormalised features, ambiguous classes) entropy falls further by scaling every task vector up than by routing,
    and WEMoE loses to TA there (0.516 / 0.535 / 0.527 against 0.533), as AdaMerging does.
    """
    problem = routing_problem
    tv = problem.task_vectors()

    def accuracy_of(result: MergeResult) -> float:
        return sum(accuracy(result.predict(t, problem.test_inputs[t]), problem.test_labels[t]) for t in tv.tasks) \
            / len(tv.tasks)

    ta = {c / 10: accuracy_of(MergeResult("task_arithmetic", tv.tasks, problem.encoder,
                                          merge_task_vectors("task_arithmetic", tv, scaling_coef=c / 10),
                                          problem.heads))
          for c in range(1, 11)}
    best = max(ta.values())
    wemoe = {}
    for seed in (0, 1, 2):
        config = dict(steps=100, batch_size=32, lr=1e-3, progress=False, seed=seed)
        trainer = build_trainer("wemoe", problem.encoder, problem.heads, tv, problem.adapt_inputs,
                                config=TrainerConfig(**config))
        trainer.run()
        result = finish(trainer)
        wemoe[seed] = accuracy_of(result)
        with torch.no_grad():
            routing = {t: {u: [round(float(v), 2) for v in w.mean(dim=0)] for u, w in
                           result.encoder.forward_with_routing(problem.test_inputs[t])[1].items()} for t in tv.tasks}
        print(f"\nseed {seed}: mean routing weights per task {routing}")
    margins = {"TA(0.3)": [round(a - ta[0.3], 3) for a in wemoe.values()],
               "best TA": [round(a - best, 3) for a in wemoe.values()]}
    print(f"TA {ta[0.3]:.3f} at 0.3, best {best:.3f} at λ={max(ta, key=ta.get)}; WEMoE {wemoe}; margins {margins}")
    for seed, acc in wemoe.items():
        assert acc > best + 0.05, (seed, acc, best)


def test_one_hot_routing_reproduces_each_expert(toy_problem):
    """The capacity the routers can reach: on the toy encoder (every layer a unit), routing e_k is expert k."""
    tv = toy_problem.task_vectors()
    trainer = build_trainer("wemoe", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                            config=TrainerConfig(**FAST), router_hidden_layers=0)
    x = toy_problem.test_inputs["task2"][:20]
    for k, task in enumerate(tv.tasks):
        with torch.no_grad():
            for router in trainer.method.routers:
                router.weights.copy_(nn.functional.one_hot(torch.tensor(k), len(tv.tasks)).float())
        expert = copy.deepcopy(toy_problem.encoder)
        expert.load_state_dict(toy_problem.experts[task])
        torch.testing.assert_close(finish(trainer).encoder(x), expert(x), atol=1e-5, rtol=1e-5)


# --- 5. resume --------------------------------------------------------------------------------------------------
def test_kill_and_resume_equals_uninterrupted(toy_problem, tmp_path):
    tv = toy_problem.task_vectors()
    cfg = dict(FAST, steps=8, lr=1e-2)
    full = adapt("wemoe", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                 config=TrainerConfig(**cfg))
    ckpt = tmp_path / "ckpt.pt"
    first = build_trainer("wemoe", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                          config=TrainerConfig(**cfg, checkpoint_every=3, checkpoint_path=ckpt))
    first.run(stop_after=5)  # "killed" after 5 iterations; the last checkpoint is at 3
    second = build_trainer("wemoe", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                           config=TrainerConfig(**cfg, checkpoint_every=3, checkpoint_path=ckpt, resume=True))
    assert second.start_step == 3
    second.run()
    resumed = finish(second)
    saved = torch.load(ckpt, weights_only=True)["method_state"]  # the routers are the method's trained state
    assert {"routers.0.net.0.weight", "routers.1.net.2.bias"} <= set(saved)
    for key, value in full.encoder_state.items():
        assert torch.equal(value, resumed.encoder_state[key]), key
    for t in tv.tasks:
        x = toy_problem.test_inputs[t][:16]
        assert torch.equal(full.predict(t, x), resumed.predict(t, x))
    assert [h["loss"] for h in full.loss_history] == [h["loss"] for h in resumed.loss_history]
    untrained = finish(build_trainer("wemoe", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                                     config=TrainerConfig(**cfg)))  # same seed, no step: training moved the routers
    key = "encoder.layer1.router.net.0.weight"
    assert not torch.equal(full.encoder_state[key], untrained.encoder_state[key])


# --- 6. options and errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    ({"router_hidden_layers": -1}, "router_hidden_layers.*integer ≥ 0"),
    ({"router_hidden_layers": True}, "router_hidden_layers"),
    ({"init_lambda": math.nan}, "init_lambda.*finite"),
    ({"units": "layer1"}, "units.*list of module paths"),
    ({"units": ["layer1", "layer1"]}, "units.*twice"),
    ({"units": ["layer3"]}, r"units: ToyEncoder has no module 'layer3'; did you mean \['layer"),
    ({"units": []}, "units.*non-empty"),
])
def test_bad_options_fail_before_the_expert_pass(toy_problem, monkeypatch, options, match):
    import symerge.adaptive as adaptive

    def no_expert_pass(*_args, **_kwargs):
        raise AssertionError("the expert pass ran before the options were checked")

    monkeypatch.setattr(adaptive, "compute_expert_cache", no_expert_pass)
    with pytest.raises(ValidationError, match=match):
        trainer_for(toy(toy_problem), **options)


def test_config_option_checks_and_unit_discovery_errors(toy_problem):
    from symerge.method_options import OptionError, check_adaptive_options

    with pytest.raises(OptionError, match="integer ≥ 0") as err:  # the config's check, before loading anything
        check_adaptive_options("wemoe", {"router_hidden_layers": -2}, 3)
    assert err.value.option == "router_hidden_layers"
    assert check_adaptive_options("wemoe", {"units": ["a.b"], "batch_reduce": True}, 3) == {"units": ["a.b"],
                                                                                             "batch_reduce": True}

    class NormOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x)

    encoder = NormOnly()
    experts = {t: {k: v + 0.1 for k, v in encoder.state_dict().items()} for t in ("a", "b")}
    tv = TaskVectors.from_state_dicts(encoder.state_dict(), experts)
    heads = {t: nn.Linear(16, 2) for t in ("a", "b")}
    inputs = {t: torch.randn(8, 16) for t in heads}
    with pytest.raises(ValidationError, match="no MLP-like unit in NormOnly.*`units` option"):
        build_trainer("wemoe", encoder, heads, tv, inputs, config=TrainerConfig(**FAST))
    with pytest.raises(ValidationError, match="units: module 'norm' .*holds no Linear/Conv"):
        build_trainer("wemoe", encoder, heads, tv, inputs, config=TrainerConfig(**FAST), units=["norm"])
    with pytest.raises(ValidationError, match="'layer1.x' lies inside|no module 'layer1.x'"):
        build_trainer("wemoe", toy_problem.encoder, toy_problem.heads, toy_problem.task_vectors(),
                      toy_problem.adapt_inputs, config=TrainerConfig(**FAST), units=["layer1", "layer1.x"])


# --- results: cost report, keeping them, refusing export ---------------------------------------------------------
def test_result_reports_its_cost_and_is_kept_with_torch_save(toy_problem, tmp_path):
    from symerge.export import write_result

    tv = toy_problem.task_vectors()
    result = adapt("wemoe", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                   config=TrainerConfig(**FAST))
    cost = result.provenance["inference_cost"]
    # routers: Linear(16,16)+Linear(16,3) for layer1, Linear(32,32)+Linear(32,3) for layer2; τ of both layers × 3 tasks
    assert cost["router_params"] == (16 * 16 + 16 + 16 * 3 + 3) + (32 * 32 + 32 + 32 * 3 + 3)
    assert cost["extra_stored_params"] == 3 * sum(p.numel() for p in toy_problem.encoder.parameters())
    assert cost["extra_params_ratio"] == pytest.approx(3.0)
    assert cost["seconds_per_sample"] > 0 and cost["merged_seconds_per_sample"] > 0 and cost["timed_samples"] == 16
    print(f"\ntoy inference cost: {cost}")
    assert result.lambdas is None and result.provenance["wemoe"]["unit_rule"] == "direct Linear/Conv children"
    path = tmp_path / "wemoe.pt"
    torch.save(result, path)
    loaded = torch.load(path, weights_only=False)
    x = toy_problem.test_inputs["task0"][:10]
    torch.testing.assert_close(loaded.predict("task0", x), result.predict("task0", x), atol=0, rtol=0)
    with pytest.raises(ValidationError, match="cannot be exported.*torch.save"):
        write_result(result, tmp_path / "out", info=None)
    assert not (tmp_path / "out").exists()


def test_symerge_merge_refuses_wemoe_up_front(bert, tmp_path):
    from symerge.config import parse_config

    config = hf_tiny.merge_config(bert, tmp_path / "out", method={"name": "wemoe", "options": {"init_lambda": 0.3}})
    with pytest.raises(ValidationError, match="method.name: adaptive method 'wemoe' .*torch.save"):
        parse_config(config, tmp_path)


def test_bert_units_are_the_mlps(bert_problem):
    model = trainer_for(bert_problem).method.model
    mixed = sorted(n.replace(".inner", "") for n, m in model.encoder.named_modules() if isinstance(m, MixedLayer))
    assert mixed == [f"body.encoder.layer.{i}.{p}.dense" for i in (0, 1) for p in ("intermediate", "output")]
    cost = finish(trainer_for(bert_problem)).provenance["inference_cost"]
    mlp = sum(p.numel() for n, p in bert_problem.encoder.named_parameters()
              if ".intermediate.dense." in n or ".output.dense." in n and ".attention." not in n)
    assert cost["extra_stored_params"] == 2 * mlp
    print(f"\ntiny BERT inference cost: {cost}")


def test_vision_batchnorm_reestimation_reaches_the_wemoe_encoder(conv_problem):
    """`--bn-reestimate` recomputes statistics on the result's own encoder (WEMoE's state has other names)."""
    from symerge.suites.vision import batchnorm_statistics

    result = finish(trainer_for(conv_problem))
    images = torch.randn(16, 3, 16, 16) + 1.0
    stats = batchnorm_statistics(result.encoder, result.encoder_state, images, batch_size=8)
    assert stats and set(stats) <= set(result.encoder_state)
    assert "encoder.features.1.inner.conv.0.1.running_mean" in stats  # BN inside a unit, under the router wrapper
    before = result.encoder_state["encoder.features.0.1.running_mean"]
    assert not torch.allclose(stats["encoder.features.0.1.running_mean"], before)
