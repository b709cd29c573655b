"""D2L: head layout, head assignment, soft-prompt dreaming, oracle, cache, state, end to end.

Everything runs on CPU with a tiny random dreamer (``Dreamer.from_config``: UNet (8, 16), 8 px
upsampled to 16 px, 2 DDIM steps) and a narrow small CNN.
"""

from __future__ import annotations

import json

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from tiny_models import tiny_pixel_dreamer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from avalanche_d2l.dreaming.dreamer import Dreamer, DreamerConfig
from avalanche_d2l.dreaming.oracle import (
    COLLAPSED,
    DEGENERATED,
    RECOGNISED,
    STEP_CAP,
    Oracle,
    ReferenceOracle,
)
from avalanche_d2l.dreaming.prompts import DreamConfig, dream_classes, dream_losses
from avalanche_d2l.models.classifiers import small_cnn
from avalanche_d2l.models.heads import MASK_VALUE, DreamHeads
from avalanche_d2l.scenarios import split_digits, tensor_benchmark
from avalanche_d2l.strategies import d2l as d2l_mod
from avalanche_d2l.strategies.d2l import (
    D2L,
    D2LConfig,
    D2LPlugin,
    der_targets,
    greedy_assignment,
    infer_input_space,
)
from avalanche_d2l.utils import seed_everything


def tiny_dreamer(seed: int = 0) -> Dreamer:
    return tiny_pixel_dreamer(seed=seed, output_size=16)


class LinearDreamer(nn.Module):
    """Stand-in dreamer whose images depend strongly on the prompt: a fixed random linear decoder
    ``sigmoid(W [p; noise])``. A random ``Dreamer.from_config`` UNet barely reacts to its prompt
    (untrained cross-attention), so checks of *what the dream losses achieve* use this; the
    mechanism through the real sampling loop is checked with the tiny diffusers dreamer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = DreamerConfig(
            kind="pixel",
            image_size=16,
            channels=1,
            prompt_len=2,
            prompt_dim=16,
            latent_size=4,
            latent_channels=1,
        )
        self.register_buffer("w", torch.randn(32 + 16, 256, generator=g) / 5)
        self.register_buffer("table", torch.randn(6, 2, 16, generator=g))

    prompt_shape = (2, 16)
    output_shape = (1, 16, 16)

    @property
    def device(self):
        return self.w.device

    def concept_embeddings(self):
        return self.table

    def random_prompt(self, n, *, generator=None):
        idx = torch.randint(0, 6, (n,), generator=generator)
        return self.table[idx] + 0.1 * torch.randn(n, 2, 16, generator=generator)

    def reference_network(self):
        return None

    def sample(
        self,
        prompt_embeds,
        *,
        generator=None,
        noise=None,
        num_inference_steps=None,
        backprop_steps=None,
        grad=True,
    ):
        if noise is None:
            noise = torch.randn(prompt_embeds.shape[0], 1, 4, 4, generator=generator)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = torch.cat([prompt_embeds.flatten(1), noise.flatten(1)], 1)
            return torch.sigmoid(z @ self.w).view(-1, 1, 16, 16)


class BankDreamer(LinearDreamer):
    """Stand-in dreamer whose world holds images like the stream's, as Stable Diffusion's world
    holds the concepts of a photo stream: a prompt selects (softmax over a fixed random
    projection) a blend of the 1,797 scikit-learn digit images at 16 px. Which digits a dream
    shows is up to the prompt, so the learner's dream loss decides it."""

    def __init__(self, seed: int = 0, temperature: float = 4.0):
        super().__init__(seed)
        from sklearn.datasets import load_digits

        bank = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
        bank = F.interpolate(bank, size=(16, 16), mode="bilinear", antialias=True)
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("bank", bank.flatten(1))
        self.register_buffer("proj", torch.randn(32, bank.shape[0], generator=g) / 32**0.5)
        self.temperature = temperature

    def sample(
        self,
        prompt_embeds,
        *,
        generator=None,
        noise=None,
        num_inference_steps=None,
        backprop_steps=None,
        grad=True,
    ):
        if noise is None:
            noise = torch.randn(prompt_embeds.shape[0], 1, 4, 4, generator=generator)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            w = (self.temperature * prompt_embeds.flatten(1) @ self.proj).softmax(1)
            x = w @ self.bank + 0.05 * F.interpolate(noise, size=(16, 16)).flatten(1)
            return x.clamp(0, 1).view(-1, 1, 16, 16)


@pytest.fixture(scope="module")
def dreamer() -> Dreamer:
    return tiny_dreamer()


@pytest.fixture(scope="module")
def bench():
    return split_digits(n_experiences=5, image_size=16, seed=0)


def quiet_evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loss_metrics(epoch=True), loggers=[]
    )


def cfg(**kw) -> DreamConfig:
    base = dict(
        steps=4, batch_per_class=2, samples_per_class=6, progress=False, oracle_threshold=1.01
    )
    base.update(kw)
    return DreamConfig(**base)


def heads_model(n_classes=10, n_extra=0, width=8) -> DreamHeads:
    return DreamHeads(
        small_cnn(n_classes, 1, width=width),
        n_classes=n_classes,
        n_extra_heads=n_extra,
        feature_layer="features",
        input_shape=(1, 16, 16),
    )


def train_on_classes(model: DreamHeads, bench, classes, steps=60):
    """Assign class c -> head c and fit the wrapped model a little on those classes."""
    model.assign({c: c for c in classes if int(model.class_to_head[c]) < 0})
    batches = [next(iter(DataLoader(e.dataset, batch_size=10_000))) for e in bench.train_stream]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep]
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# head layout and assignment


def test_forward_masks_unassigned_classes_and_fresh_model_is_identity():
    model = heads_model().eval()
    x = torch.rand(64, 1, 16, 16)
    heads = model.forward_heads(x)
    assert torch.equal(model(x), heads[:, :10])  # fresh: identity, no mask

    model.assign({3: 7, 5: 2})
    model.set_dream_heads([0, 9])
    out = model(x)
    assert out.shape == (64, 10) and torch.isfinite(out).all()
    assert torch.equal(out[:, 3], heads[:, 7]) and torch.equal(out[:, 5], heads[:, 2])
    others = [c for c in range(10) if c not in (3, 5)]
    assert (out[:, others] == MASK_VALUE).all()
    assert set(out.argmax(1).tolist()) <= {3, 5}  # never an unassigned class / dream head

    model.train()
    out_train = model(x)  # training: class space + one column per dream head
    assert out_train.shape == (64, 12)
    assert torch.allclose(out_train[:, 10:], model.forward_heads(x)[:, [0, 9]])
    assert model.dream_targets(torch.tensor([9, 0])).tolist() == [11, 10]
    with pytest.raises(ValueError):
        model.set_dream_heads([7])  # head of class 3


def test_greedy_assignment_on_constructed_counts():
    counts = torch.tensor([[5.0, 9.0, 0.0], [8.0, 10.0, 1.0]])
    # largest count 10 -> (1, 1); then row 0's best free column is 0 (5 > 0)
    assert greedy_assignment(counts) == [(0, 0), (1, 1)]
    # ties: lower row first, then lower column
    assert greedy_assignment(torch.ones(2, 3)) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError):
        greedy_assignment(torch.ones(3, 2))


def test_plugin_assigns_free_heads_by_prediction_counts(bench, dreamer):
    """Bias the head logits so class a lands on head 6 and class b on head 8: greedy follows."""
    exp = bench.train_stream[0]
    a, b = sorted(int(c) for c in exp.classes_in_this_experience)
    model = heads_model()
    bias = model.net.classifier.bias
    with torch.no_grad():
        model.net.classifier.weight.zero_()
        bias.fill_(-5.0)
        bias[6] = 5.0  # everything lands on head 6 ...
        bias[8] = 4.0  # ... and head 8 is the runner-up
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        train_mb_size=64,
        train_epochs=1,
        evaluator=quiet_evaluator(),
        plugins=[D2LPlugin(dreamer, cfg(steps=0))],
    )
    strategy.experience = exp
    plugin = strategy.plugins[0]
    mapping = plugin.assign_heads(strategy)
    # both classes count all samples on head 6: the lower class takes it, the other gets the
    # next free head by count (all zero) -> the lowest free head
    assert mapping == {a: 6, b: 0}
    assert model.class_to_head[a] == 6 and model.class_to_head[b] == 0
    assert plugin.assign_heads(strategy) == {}  # already assigned: nothing changes


# ---------------------------------------------------------------------------------------------
# dreaming


def test_gradients_reach_the_prompt_through_the_sampling_loop(dreamer):
    model = heads_model().eval()
    prompt = dreamer.random_prompt(3, generator=torch.Generator().manual_seed(0))
    for backprop_steps in (None, 1):
        p = prompt.clone().requires_grad_(True)
        images = dreamer.sample(
            p, generator=torch.Generator().manual_seed(1), backprop_steps=backprop_steps
        )
        loss = F.cross_entropy(model.forward_heads(images), torch.tensor([4, 5, 6]))
        loss.backward()
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    assert all(q.grad is None for q in dreamer.parameters())  # frozen dreamer


def test_prompt_moves_and_dream_loss_falls(bench, dreamer):
    seed_everything(0)
    model = train_on_classes(heads_model(), bench, [0, 1], steps=40)
    init = dreamer.random_prompt(3, generator=torch.Generator().manual_seed(3))
    previous = {h: init[i] for i, h in enumerate([5, 6, 7])}
    # fixed noise: the objective is a deterministic function of the prompts, so Adam must lower it
    config = cfg(steps=20, lr=0.1, batch_per_class=2, refine=True, fixed_noise=True)
    result = dream_classes(
        dreamer=dreamer,
        classifier=model,
        heads=[5, 6, 7],
        seen_heads=[0, 1],
        config=config,
        previous_prompts=previous,
    )
    hist = result.history
    assert hist["steps"] == 20 and all(s["reason"] == STEP_CAP for s in hist["stop"].values())
    assert not torch.allclose(result.prompts, init)
    assert (result.prompts - init).flatten(1).norm(dim=1).min() > 1e-3  # every prompt moved
    first, last = sum(hist["loss"][:3]) / 3, sum(hist["loss"][-3:]) / 3
    assert last < first, (first, last)
    assert (
        result.images.shape == (18, 1, 16, 16)
        and result.labels.tolist() == [5] * 6 + [6] * 6 + [7] * 6
    )
    assert model.training is False and all(p.requires_grad for p in model.parameters())


def test_dreams_are_distinct_from_seen_classes_by_the_learners_measure(bench):
    dreamer = LinearDreamer()
    seed_everything(1)
    model = train_on_classes(heads_model(), bench, [0, 1, 2, 3], steps=80)
    config = cfg(steps=40, lr=0.3, batch_per_class=3, samples_per_class=10)
    heads = [6, 8]
    x0 = dreamer.sample(
        dreamer.random_prompt(2, generator=torch.Generator().manual_seed(0)),
        grad=False,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        before = model.forward_heads(x0)[:, [0, 1, 2, 3, 6, 8]].softmax(1)[:, :4].sum(1).mean()
    result = dream_classes(
        dreamer=dreamer, classifier=model, heads=heads, seen_heads=[0, 1, 2, 3], config=config
    )
    seen_mass = result.history["final_seen_mass"]
    target = result.history["final_target_prob"]
    assert max(seen_mass.values()) < 0.5 and max(seen_mass.values()) < float(before)
    # most of the learner's mass is on the dream heads, and each dream's own head gets more than
    # chance; the dream heads are untrained here (that comes from training on the dreams)
    assert min(target.values()) > 1 / 6  # above chance over the 6 visible heads


def test_seen_mass_term_pulls_the_seen_mass_towards_its_target():
    """``seen_mass = 0`` pushes the learner's mass on seen classes down wherever it is;
    ``seen_mass = m`` pulls it up from below ``m`` and down from above (the boundary objective)."""

    def grad_of_seen_term(p_seen: float, m: float) -> float:
        logit = torch.tensor(0.0, requires_grad=True)  # seen-vs-dream split: p_seen = sigmoid
        shift = torch.logit(torch.tensor(p_seen))
        z = torch.stack([logit + shift, torch.tensor(0.0)]).unsqueeze(0)  # 1 seen, 1 dream head
        terms = dream_losses(
            z,
            torch.ones(1, 4),
            targets=torch.tensor([1]),
            n_seen=1,
            class_index=torch.zeros(1, dtype=torch.long),
            n_active=1,
            other_means=None,
            prompts=torch.ones(1, 2, 2),
            concept_norm=2.0,
            config=DreamConfig(seen_mass=m),
        )
        terms["seen"].backward()
        return float(logit.grad)  # > 0: descending lowers p_seen; < 0: raises it

    assert grad_of_seen_term(0.3, 0.0) > 0 and grad_of_seen_term(0.9, 0.0) > 0
    assert grad_of_seen_term(0.3, 0.8) < 0 < grad_of_seen_term(0.95, 0.8)
    with pytest.raises(ValueError, match="seen_mass"):
        DreamConfig(seen_mass=1.0)


def test_boundary_objective_keeps_dreams_nearer_the_seen_classes(bench):
    """Through the real optimisation loop: with ``seen_mass=0.8`` the dreams end with more of
    the learner's mass on the seen classes than with ``seen_mass=0`` from the same start, and
    with ``oracle_threshold=None`` only the step cap stops them."""
    dreamer = LinearDreamer()
    seed_everything(1)
    model = train_on_classes(heads_model(), bench, [0, 1, 2, 3], steps=80)
    mass = {}
    for m in (0.0, 0.8):
        config = cfg(
            steps=40,
            lr=0.3,
            batch_per_class=3,
            samples_per_class=10,
            seen_mass=m,
            oracle_threshold=None,
        )
        result = dream_classes(
            dreamer=dreamer, classifier=model, heads=[6, 8], seen_heads=[0, 1, 2, 3], config=config
        )
        assert {s["reason"] for s in result.history["stop"].values()} == {STEP_CAP}
        mass[m] = sum(result.history["final_seen_mass"].values()) / 2
    assert mass[0.8] > mass[0.0] + 0.1, mass


def test_oracle_rules_and_halt_restores_previous_prompt(dreamer):
    imgs = torch.rand(4, 1, 16, 16)

    class Uniform(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 5)

    class OneConcept(nn.Module):
        def forward(self, x):
            out = torch.full((x.shape[0], 5), -20.0)
            out[:, 2] = 20.0
            return out

    plain = ReferenceOracle(threshold=0.6, max_steps=3)
    assert plain.should_stop(imgs, torch.full((4,), 0.5), 0) == (False, "")
    assert plain.should_stop(imgs, torch.full((4,), 0.7), 1) == (True, RECOGNISED)
    assert plain.should_stop(imgs, torch.full((4,), 0.1), 3) == (True, STEP_CAP)
    deg = ReferenceOracle(reference=Uniform(), threshold=0.6, max_steps=9)
    assert deg.should_stop(imgs, torch.full((4,), 0.1), 0) == (False, "")  # not before min_steps
    assert deg.should_stop(imgs, torch.full((4,), 0.1), 1) == (True, DEGENERATED)
    col = ReferenceOracle(reference=OneConcept(), threshold=0.6, max_steps=9)
    assert col.should_stop(imgs, torch.full((4,), 0.1), 1) == (True, COLLAPSED)
    assert isinstance(col, Oracle)

    class HaltAtOne:
        def should_stop(self, images, classifier_probs, step):
            return (True, DEGENERATED) if step == 1 else (False, "")

    model = heads_model().eval()
    init = dreamer.random_prompt(2, generator=torch.Generator().manual_seed(5))
    result = dream_classes(
        dreamer=dreamer,
        classifier=model,
        heads=[4, 5],
        seen_heads=[0],
        config=cfg(steps=5, lr=0.5),
        oracle=HaltAtOne(),
        previous_prompts={4: init[0], 5: init[1]},
    )
    assert all(
        s == {"step": 1, "reason": DEGENERATED, "target_prob": s["target_prob"]}
        for s in result.history["stop"].values()
    )
    assert torch.allclose(result.prompts, init)  # the step-1 update was undone


def test_dreamer_reference_network_drives_default_oracle(dreamer):
    assert dreamer.reference_network() is None  # tiny dreamer: threshold + cap only
    model = heads_model().eval()
    result = dream_classes(
        dreamer=dreamer,
        classifier=model,
        heads=[3],
        seen_heads=[0],
        config=cfg(steps=2, oracle_threshold=0.0),
    )
    assert result.history["stop"][3]["reason"] == RECOGNISED
    assert result.history["steps"] == 0  # recognised at once: no update


# ---------------------------------------------------------------------------------------------
# strategy


def make_d2l(dreamer, tmp_path, model=None, **kw):
    seed_everything(0)
    model = model if model is not None else small_cnn(10, 1, width=8)
    opt = torch.optim.Adam(model.parameters(), kw.pop("optimizer_lr", 1e-3))
    args = dict(
        model=model,
        optimizer=opt,
        mem_size=40,
        dreamer=dreamer,
        dreams="optimised",
        dream_config=cfg(steps=2),
        train_mb_size=32,
        train_epochs=1,
        evaluator=quiet_evaluator(),
        cache_dir=tmp_path / "dreams",
    )
    args.update(kw)
    return D2L(**args)


def plugin_door(plugins) -> Naive:
    """D2L through the plugin door: Naive on a DreamHeads-wrapped narrow small CNN (seeded as
    :func:`make_d2l`'s) with ``plugins``."""
    seed_everything(0)
    net = small_cnn(10, 1, width=8)
    return Naive(
        model=DreamHeads(net, n_classes=10, feature_layer="features", input_shape=(1, 16, 16)),
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        train_mb_size=32,
        train_epochs=1,
        evaluator=quiet_evaluator(),
        plugins=plugins,
    )


def test_two_experience_run_with_replay_no_nan(bench, dreamer, tmp_path):
    strategy = make_d2l(dreamer, tmp_path)
    plugin = strategy.d2l_plugin
    assert any(isinstance(p, ReplayPlugin) for p in strategy.plugins)
    losses = []
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
        losses.append(strategy.evaluator.get_last_metrics())
        res = strategy.eval(bench.test_stream[:2])
        acc = res["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        assert 0.0 <= acc <= 1.0
    model = strategy.model
    classes = [int(c) for e in bench.train_stream[:2] for c in e.classes_in_this_experience]
    assert sorted(model.seen_heads()) == sorted(set(model.seen_heads()))
    assert all(int(model.class_to_head[c]) >= 0 for c in classes)
    # dreams live only on free heads, never in the buffer
    free = set(model.free_heads())
    assert set(plugin.dream_labels.tolist()) == set(model.dream_heads.tolist()) <= free
    buffer = strategy.replay_plugin.storage_policy.buffer
    assert set(int(y) for y in buffer.targets) <= set(classes)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert plugin.history[-1]["experience"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in losses[-1].values() if isinstance(v, float))


def test_dream_cache_avoids_redreaming(bench, dreamer, tmp_path, monkeypatch):
    s1 = make_d2l(dreamer, tmp_path)
    s1.train(bench.train_stream[0])
    files = list((tmp_path / "dreams").glob("dreams_exp0_*.pt"))
    assert len(files) == 1
    assert torch.load(files[0], weights_only=True)["images_u8"].dtype == torch.uint8
    assert s1.d2l_plugin.dreams_loaded_from_cache == 0

    def boom(**kw):
        raise AssertionError("dreamed again although the cache matches")

    monkeypatch.setattr(d2l_mod, "dream_classes", boom)
    s2 = make_d2l(dreamer, tmp_path)
    s2.train(bench.train_stream[0])
    assert s2.d2l_plugin.dreams_loaded_from_cache == 1
    assert torch.equal(s1.d2l_plugin.dream_images, s2.d2l_plugin.dream_images)
    # other settings -> other hash -> dreams again (here: the patched function raises)
    s3 = make_d2l(dreamer, tmp_path, dream_config=cfg(steps=3))
    with pytest.raises(AssertionError, match="dreamed again"):
        s3.train(bench.train_stream[0])


def test_state_round_trip_plugin_and_checkpoint(bench, dreamer, tmp_path):
    from avalanche_d2l.checkpointing import load_strategy, save_strategy

    strategy = make_d2l(dreamer, tmp_path)
    strategy.train(bench.train_stream[0])
    plugin = strategy.d2l_plugin
    state = plugin.state_dict()
    fresh = D2LPlugin(dreamer, cfg(steps=2))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dream_images, plugin.dream_images)
    assert fresh.prompts.keys() == plugin.prompts.keys()
    assert fresh.assignments == plugin.assignments
    assert "class_to_head" in strategy.model.state_dict()

    ckpt = tmp_path / "ckpt.pkl"
    save_strategy(strategy, ckpt)
    other = make_d2l(dreamer, tmp_path)
    other, next_exp = load_strategy(other, ckpt)
    assert next_exp == 1
    assert torch.equal(other.model.class_to_head, strategy.model.class_to_head)
    assert torch.equal(other.d2l_plugin.dream_labels, plugin.dream_labels)
    for a, b in zip(other.model.state_dict().values(), strategy.model.state_dict().values()):
        assert torch.equal(a, b)
    other.train(bench.train_stream[1])  # the resumed strategy keeps going
    assert len(other.d2l_plugin.assignments) == 2


class TwoOutputNet(nn.Module):
    """A model whose head cannot grow: 2 outputs only."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(self.body(x))


def test_model_with_fixed_head_gets_extra_head_on_feature_layer(bench, dreamer, tmp_path):
    net = TwoOutputNet()
    with pytest.raises(ValueError, match="feature_layer"):
        make_d2l(dreamer, tmp_path, model=net, n_classes=10, feature_layer="nope")
    strategy = make_d2l(
        dreamer, tmp_path, model=net, n_classes=10, feature_layer="body", n_extra_heads=2
    )
    model = strategy.model
    # no image_shape: the extra head is sized from the first experience, before the optimizer
    assert model.n_out == 2 and model.extra_head is None
    strategy.train(bench.train_stream[0])
    assert model.extra_head.out_features == 10
    opt_ids = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert id(model.extra_head.weight) in opt_ids  # the optimizer covers the new head
    w0 = model.extra_head.weight.detach().clone()
    strategy.train(bench.train_stream[1])
    assert not torch.equal(model.extra_head.weight, w0)
    assert model.forward_heads(torch.rand(3, 1, 16, 16)).shape == (3, 12)
    res = strategy.eval(bench.test_stream[:2])
    assert 0.0 <= res["Top1_Acc_Stream/eval_phase/test_stream/Task000"] <= 1.0


def test_plugin_door_equals_strategy_door(bench, dreamer, tmp_path):
    a = make_d2l(dreamer, tmp_path, cache_dir=None)
    b = plugin_door(
        [ReplayPlugin(mem_size=40), D2LPlugin(dreamer, cfg(steps=2), dreams="optimised")]
    )
    for s in (a, b):
        seed_everything(1)
        s.train(bench.train_stream[0])
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb)
    # replay plugin after D2LPlugin: the sleep phase would miss the current experience
    c = plugin_door([D2LPlugin(dreamer, cfg(steps=1)), ReplayPlugin(mem_size=40)])
    with pytest.warns(UserWarning, match="put the replay plugin first"):
        c.train(bench.train_stream[0])
    with pytest.raises(TypeError, match="DreamHeads"):
        bad = Naive(
            model=small_cnn(10, 1, width=8),
            optimizer=torch.optim.SGD(small_cnn(10, 1, width=8).parameters(), lr=0.1),
            evaluator=quiet_evaluator(),
            plugins=[D2LPlugin(dreamer, cfg())],
        )
        bad.train(bench.train_stream[0])


# ---------------------------------------------------------------------------------------------
# configs


def test_d2l_config_defaults_are_the_cpu_preset_and_dicts_are_checked():
    c = D2LConfig()
    assert (c.dreamer, c.n_extra_heads, c.dreams) == ("offline", 0, "random")
    preset = dict(
        steps=10,
        lr=0.05,
        batch_per_class=4,
        samples_per_class=64,
        backprop_steps=2,
        dream_weight=1.0,
        sleep_epochs=1,
        generate_batch_size=256,
    )
    assert {k: getattr(c.dream, k) for k in preset} == preset
    # a nested dream section changes the preset, not DreamConfig()'s own defaults
    d = D2LConfig.from_dict({"dream": {"steps": 3}, "dreams": "optimised", "n_extra_heads": 2})
    assert (d.dream.steps, d.dream.samples_per_class, d.dreams) == (3, 64, "optimised")
    assert D2LConfig.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert D2LConfig.from_dict({}) == D2LConfig()
    with pytest.raises(ValueError, match="valid keys.*dreamer_overrides"):
        D2LConfig.from_dict({"dreamz": "noise"})
    with pytest.raises(ValueError, match="unknown DreamConfig fields"):
        D2LConfig.from_dict({"dream": {"stepz": 3}})
    with pytest.raises(ValueError, match="dreams must be one of"):
        D2LConfig(dreams="banana")
    quiet = D2LConfig.from_dict({"dream": {"progress": False}})
    assert quiet.fingerprint() == c.fingerprint()
    assert d.fingerprint() != c.fingerprint()


def test_tensor_benchmark_with_more_heads_than_outputs_runs(dreamer, tmp_path):
    """4-class stream, small CNN with 4 outputs and 2 extra dream heads (extra head needed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 16, 16, generator=g)
    y = torch.arange(4).repeat(20)
    x = x + y.view(-1, 1, 1, 1) * 0.5
    bench = tensor_benchmark(x, y, x[:40], y[:40], n_experiences=2, seed=0)
    strategy = make_d2l(
        dreamer, tmp_path, model=small_cnn(4, 1, width=8), n_classes=4, n_extra_heads=2
    )
    for exp in bench.train_stream:
        strategy.train(exp)
    assert strategy.model.n_heads == 6 and len(strategy.model.seen_heads()) == 4
    # every class has a head -> no dreaming after the last experience
    assert strategy.d2l_plugin.dream_labels is None
    assert strategy.model.dream_heads.numel() == 0


# ---------------------------------------------------------------------------------------------
# sleep phase and coherence term


def _dream_head_prob(strategy) -> float:
    """Mean probability the learner gives each dream image's own head (seen + dream heads)."""
    model, plugin = strategy.model, strategy.d2l_plugin
    visible = model.seen_heads() + model.dream_heads.tolist()
    col = {h: i for i, h in enumerate(visible)}
    with torch.no_grad():
        model.eval()
        p = model.forward_heads(plugin.dream_images)[:, visible].softmax(1)
    idx = torch.tensor([col[int(h)] for h in plugin.dream_labels])
    return float(p.gather(1, idx[:, None]).mean())


def test_sleep_phase_learns_the_dreams_before_the_next_experience(bench, tmp_path):
    # the linear stand-in dreamer: its dreams differ by prompt, so dream heads can be told apart
    probs, steps = {}, {}
    for epochs in (0, 10):
        s = make_d2l(
            LinearDreamer(),
            tmp_path / f"s{epochs}",
            optimizer_lr=3e-3,
            dream_config=cfg(steps=2, samples_per_class=16, sleep_epochs=epochs),
        )
        s.train(bench.train_stream[0])
        probs[epochs] = _dream_head_prob(s)
        steps[epochs] = s.d2l_plugin.history[-1]["sleep_steps"]
        buffer_classes = {int(y) for y in s.replay_plugin.storage_policy.buffer.targets}
        assert buffer_classes <= {int(c) for c in bench.train_stream[0].classes_in_this_experience}
    n_dreams = s.d2l_plugin.dream_labels.numel()
    assert n_dreams == 8 * 16
    assert steps[0] == 0 and steps[10] == 10 * -(-n_dreams // 32)
    # the same dreams, recognised as their own heads far better after sleeping on them
    assert probs[10] > probs[0] + 0.2, probs


def test_train_dream_weight_zero_keeps_dreams_out_of_the_experiences_training(bench, tmp_path):
    """``train_dream_weight=0``: the dreams are learned in the sleep phase (as before) and add no
    loss while the next experience trains; ``None`` adds ``dream_weight * CE(dreams)``."""
    added = {}
    for w in (None, 0.0):
        s = make_d2l(
            LinearDreamer(),
            tmp_path / f"w{w}",
            dream_config=cfg(steps=1, samples_per_class=8, sleep_epochs=1, train_dream_weight=w),
        )
        s.train(bench.train_stream[0])
        assert s.d2l_plugin.history[-1]["sleep_steps"] > 0  # sleep unchanged
        s.loss = torch.zeros(())
        s.d2l_plugin.before_backward(s)
        added[w] = float(s.loss)
    assert added[0.0] == 0.0 and added[None] > 0.1, added


def test_sleep_without_a_replay_buffer_is_skipped_with_a_warning(bench, dreamer, tmp_path):
    plugin = D2LPlugin(dreamer, cfg(steps=1, sleep_epochs=2))
    strategy = plugin_door([plugin])
    with pytest.warns(UserWarning, match="no \\(non-empty\\) replay buffer"):
        strategy.train(bench.train_stream[0])
    assert plugin.history[-1]["sleep_steps"] == 0 and plugin.dream_labels.numel() > 0


def test_bn_coherence_is_zero_on_the_learners_own_statistics_and_falls_under_dreaming(bench):
    from avalanche_d2l.dreaming.prompts import _batchnorms, _BNInputs, bn_coherence

    seed_everything(2)
    model = train_on_classes(heads_model(), bench, [0, 1, 2], steps=40)
    bns = _batchnorms(model)
    assert len(bns) == 3
    x = torch.rand(64, 1, 16, 16)
    with _BNInputs(bns) as rec, torch.no_grad():
        model.forward_heads(x)
    # running statistics set to this batch's own statistics -> zero distance
    probe = heads_model()
    probe.load_state_dict(model.state_dict())
    pbns = _batchnorms(probe)
    for inp, m in zip(rec.inputs, pbns):
        dims = [0, 2, 3]
        m.running_mean.copy_(inp.mean(dims))
        m.running_var.copy_(inp.var(dims, unbiased=False))
    assert float(bn_coherence(rec.inputs, pbns)) < 1e-4
    assert float(bn_coherence(rec.inputs, bns)) > 0.1

    # only the coherence term: prompt optimisation brings the dreams' statistics to the learner's
    config = cfg(
        steps=25,
        lr=0.3,
        batch_per_class=4,
        fixed_noise=True,
        w_target=0.0,
        w_seen=0.0,
        w_distinct=0.0,
        w_consistency=0.0,
        w_norm=0.0,
        w_coherence=1.0,
    )
    result = dream_classes(
        dreamer=LinearDreamer(),
        classifier=model,
        heads=[5, 6],
        seen_heads=[0, 1, 2],
        config=config,
    )
    coh = result.history["coherence"]
    assert len(coh) == 25 and sum(coh[-3:]) / 3 < 0.8 * sum(coh[:3]) / 3, coh

    plain = DreamHeads(
        nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10)),
        n_classes=10,
        feature_layer="2",
        input_shape=(1, 16, 16),
    )
    with pytest.raises(ValueError, match="needs BatchNorm layers"):
        dream_classes(
            dreamer=LinearDreamer(),
            classifier=plain,
            heads=[5],
            seen_heads=[0],
            config=cfg(w_coherence=1.0),
        )


# ---------------------------------------------------------------------------------------------
# rehearsal hosts: ER-ACE and DER++ with the plugin


def host_strategy(host: str, dreamer, *, mem_size=40):
    from avalanche.training import DER, ER_ACE

    seed_everything(0)
    net = small_cnn(10, 1, width=8)
    cls = ER_ACE if host == "er_ace" else DER
    plugin = D2LPlugin(dreamer, cfg(steps=1, samples_per_class=8))
    strategy = cls(
        model=DreamHeads(net, n_classes=10, feature_layer="features"),
        optimizer=torch.optim.Adam(net.parameters(), 3e-3),
        mem_size=mem_size,
        train_mb_size=32,
        train_epochs=4,
        eval_mb_size=64,
        evaluator=quiet_evaluator(),
        plugins=[plugin],
    )
    return strategy, plugin


@pytest.mark.parametrize("host", ["er_ace", "der"])
def test_plugin_composes_with_er_ace_and_der_using_their_buffer(bench, dreamer, host):
    strategy, plugin = host_strategy(host, dreamer)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    # the host's own buffer, found on the strategy, fed the sleep phase with its own loss
    assert plugin.history[-1]["host"] == host and plugin.history[-1]["sleep_steps"] > 0
    buffer = strategy.storage_policy.buffer
    classes = {int(c) for e in bench.train_stream[:2] for c in e.classes_in_this_experience}
    assert {int(y) for y in buffer.targets} <= classes  # dreams never enter the buffer
    if host == "der":
        # DER's stored logits stay in class space: as wide as the classes, dream columns apart
        logits = next(iter(DataLoader(buffer, batch_size=8)))[3]
        assert logits.shape[1] == 10
    acc = strategy.eval(bench.test_stream[:2])["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert acc > 0.6  # 4 classes seen: well above chance (0.25), both experiences learned
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())


def test_der_targets_cover_only_the_classes_the_stored_logits_describe():
    stored = torch.tensor([[1.0, MASK_VALUE, 2.0], [0.5, MASK_VALUE, MASK_VALUE]])
    current = torch.tensor([[0.0, 3.0, 1.0, 7.0], [1.0, 0.2, 4.0, -1.0]], requires_grad=True)
    target = der_targets(stored, current, n_classes=3)
    assert target.shape == current.shape and not target.requires_grad
    # stored class columns kept; a class without a head at storage is held at or below the
    # sample's lowest stored logit (3.0 -> 1.0, 4.0 -> 0.5; 0.2 is already below 0.5); the dream
    # column takes the current output
    assert torch.equal(target, torch.tensor([[1.0, 1.0, 2.0, 7.0], [0.5, 0.2, 0.5, -1.0]]))
    F.mse_loss(current, target).backward()
    # the stored entries and the two masked ones scoring above their sample's stored classes
    # pull; the masked one already below and the dream columns do not
    assert torch.equal(
        current.grad != 0,
        torch.tensor([[True, True, True, False], [True, False, True, False]]),
    )


def test_der_distillation_keeps_classes_without_a_head_at_storage_below_the_stored_ones():
    """DER++ distils, for a class not seen yet when a sample was stored, the low logit its output
    unit had; under D2L that column was masked. Training on the aligned targets must push such a
    class back below the sample's stored classes (the plain-DER behaviour that keeps new classes
    from taking old samples), leave the stored classes at their stored logits, and leave the
    dream column alone."""
    stored = torch.tensor([[3.0, 1.0, MASK_VALUE], [0.5, 2.0, MASK_VALUE], [2.0, 1.0, MASK_VALUE]])
    start = torch.tensor([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 4.0, -2.0], [0.0, 0.0, -3.0, 0.0]])
    logits = nn.Parameter(start.clone())
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(logits, der_targets(stored, logits, n_classes=3)).backward()
        opt.step()
    out = logits.detach()
    assert torch.allclose(out[:, :2], stored[:, :2], atol=1e-3)  # stored classes distilled
    lowest = stored[:, :2].min(1).values
    assert (out[:2, 2] <= lowest[:2] + 1e-3).all()  # new class pushed below: 5 -> 1, 4 -> 0.5
    assert out[2, 2] == start[2, 2]  # already below its sample's stored classes: untouched
    assert torch.equal(out[:, 3], start[:, 3])  # dream column: not distilled


@pytest.mark.parametrize("dreams", ["random", "optimised"])
def test_next_experience_scores_above_chance_at_start_where_the_host_scores_zero(bench, dreams):
    """D2L's forward transfer: after the sleep phase, experience 1's classes inherit dream heads
    and score above chance before any training on them; plain ER (same model, buffer, epochs)
    predicts only seen classes there: 0. The tiny random UNet of ``tiny_models`` draws noise
    whatever its prompt (its dreams measured 0.0 here), so the dreamer is :class:`BankDreamer`,
    whose world holds digit-like images as Stable Diffusion's holds a photo stream's concepts."""
    from avalanche.training import Replay

    from avalanche_d2l.evaluation import make_evaluator

    at_start = {}
    for name in ("d2l", "replay"):
        seed_everything(0)
        net = small_cnn(10, 1, width=16)
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        ev = make_evaluator(bench, interactive=False, timing=False)
        if name == "d2l":
            s = D2L(
                model=net,
                optimizer=opt,
                mem_size=60,
                dreamer=BankDreamer(),
                dreams=dreams,
                dream_config=cfg(steps=4, lr=0.3, samples_per_class=64, sleep_epochs=6),
                train_mb_size=32,
                train_epochs=2,
                evaluator=ev,
            )
        else:
            s = Replay(
                model=net,
                optimizer=opt,
                criterion=nn.CrossEntropyLoss(),
                mem_size=60,
                train_mb_size=32,
                train_epochs=2,
                evaluator=ev,
            )
        for exp in bench.train_stream[:2]:
            s.train(exp)
        fwt = next(m for m in ev.metrics if type(m).__name__ == "ForwardTransferAtStart")
        at_start[name] = fwt.accuracy_at_start[1]
    assert at_start["replay"] == 0.0
    # chance among the 4 classes the learner can then predict is 0.25
    assert at_start["d2l"] > 0.25, at_start


# ---------------------------------------------------------------------------------------------
# any benchmark: input space learned from the data, dreamer fitted to it


def _stream(size: int, channels: int, normalise: bool):
    """A 4-class stream of [0, 1] images (optionally normalised by a ``Normalize`` transform in
    both transform groups, as a user's torchvision pipeline would)."""
    import torchvision.transforms as T

    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(12)
    x = torch.rand(len(y), channels, size, size, generator=g) * 0.5
    x[:, :, : size // 2] += y.view(-1, 1, 1, 1) * 0.15
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # the full [0, 1] range in every image
    from avalanche.benchmarks import nc_benchmark

    x = x.clamp(0, 1)
    norm = T.Normalize([0.5] * channels, [0.25] * channels) if normalise else None
    return nc_benchmark(
        UserImages(x, y),
        UserImages(x[:16], y[:16]),
        n_experiences=2,
        task_labels=False,
        seed=0,
        train_transform=norm,
        eval_transform=norm,
    )


class UserImages(torch.utils.data.Dataset):
    """A user's own dataset: tensors and a ``targets`` list (no Avalanche helper)."""

    def __init__(self, x, y):
        self.x, self.targets = x, [int(v) for v in y]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


@pytest.mark.parametrize(("size", "channels", "normalise"), [(28, 1, False), (32, 3, True)])
def test_dreams_match_a_real_batch_in_dtype_shape_and_value_range(size, channels, normalise):
    bench = _stream(size, channels, normalise)
    exp = bench.train_stream[0]
    space = infer_input_space(exp.dataset)
    assert space.shape == (channels, size, size)
    assert space.mean == ((0.5,) * channels if normalise else None)
    seed_everything(0)
    net = small_cnn(4, channels, width=8)
    # default constructor arguments except the (tiny) dreamer: 8 px grey native images
    s = D2L(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        mem_size=20,
        dreamer=tiny_pixel_dreamer(),
        dream_config=cfg(steps=1, samples_per_class=4),
        n_extra_heads=2,
        evaluator=quiet_evaluator(),
    )
    s.train(exp)
    real = next(iter(DataLoader(exp.dataset.eval(), batch_size=64)))[0]
    dreams = s.d2l_plugin.dream_images
    assert dreams.dtype == real.dtype and dreams.shape[1:] == real.shape[1:]
    lo, hi = float(real.min()), float(real.max())  # the range of the real inputs
    assert (lo, hi) == ((-2.0, 2.0) if normalise else (0.0, 1.0))
    assert lo - 1e-4 <= float(dreams.min()) and float(dreams.max()) <= hi + 1e-4
    assert float(dreams.max()) - float(dreams.min()) > 0.25 * (hi - lo)  # not a constant
    assert s.d2l_plugin.dreamer.output_shape == (channels, size, size)
    # the extra head was sized from the data and trained
    assert s.model.extra_head is not None and s.model.extra_head.in_features > 0
    s.train(bench.train_stream[1])


def test_dream_heads_never_build_a_zero_width_layer():
    net = TwoOutputNet()
    with pytest.raises(ValueError, match="pass feature_layer"):
        DreamHeads(net, n_classes=10)
    heads = DreamHeads(net, n_classes=10, feature_layer="body")  # sized later, from the data
    assert heads.needs_build and heads.extra_head is None
    with pytest.raises(RuntimeError, match="input_shape"):
        heads.train()(torch.rand(2, 1, 16, 16))
    assert heads.build((1, 16, 16)) and heads.extra_head.in_features == 16
    assert heads.eval()(torch.rand(2, 1, 16, 16)).shape == (2, 10)

    class Empty(nn.Module):  # a feature layer with no output units
        def __init__(self):
            super().__init__()
            self.feat = nn.Flatten(start_dim=1)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            self.feat(x[:, :0])
            return self.out(x.flatten(1)[:, :4])

    with pytest.raises(ValueError, match="non-empty output"):
        DreamHeads(Empty(), n_classes=4, feature_layer="feat", input_shape=(1, 2, 2))


# ---------------------------------------------------------------------------------------------
# control variants


def test_control_variants_random_prompts_and_noise_images(bench, dreamer, tmp_path):
    from avalanche_d2l.dreaming.prompts import init_prompts

    s = make_d2l(dreamer, tmp_path / "r", dreams="random", dream_config=cfg(steps=3))
    s.train(bench.train_stream[0])
    plugin = s.d2l_plugin
    heads = sorted(plugin.prompts)
    g = torch.Generator().manual_seed(plugin.config.seed + 0)
    init, _ = init_prompts(plugin.dreamer, heads, config=plugin.config, generator=g)
    # never optimised: the prompts are exactly their random initialisation
    assert torch.allclose(torch.stack([plugin.prompts[h] for h in heads]), init)
    assert plugin.history[-1]["steps"] == 0

    n = make_d2l(dreamer, tmp_path / "n", dreams="noise")
    n.train(bench.train_stream[0])
    imgs = n.d2l_plugin.dream_images
    assert n.d2l_plugin.dreamer is None and imgs.shape == (8 * 6, 1, 16, 16)
    assert 0.4 < float(imgs.mean()) < 0.6 and float(imgs.std()) > 0.2  # uniform noise


# ---------------------------------------------------------------------------------------------
# dream cache: keyed by the learner, corrupt files set aside, checkpoints reference it


def test_stale_dream_cache_after_a_change_of_learner_settings_is_not_reused(
    bench, dreamer, tmp_path
):
    a = make_d2l(dreamer, tmp_path)
    a.train(bench.train_stream[0])
    # same dream settings, another learning rate: another learner at dreaming time
    b = make_d2l(dreamer, tmp_path, optimizer_lr=5e-3)
    b.train(bench.train_stream[0])
    assert b.d2l_plugin.dreams_loaded_from_cache == 0
    assert not torch.equal(a.d2l_plugin.dream_images, b.d2l_plugin.dream_images)
    files = list((tmp_path / "dreams").glob("dreams_exp0_*.pt"))
    assert len(files) == 1  # the stale set was pruned

    # a file that fails to load is reported with its path, moved aside and rebuilt
    files[0].write_bytes(b"not a torch file")
    c = make_d2l(dreamer, tmp_path, optimizer_lr=5e-3)
    with pytest.warns(UserWarning, match=str(files[0].name)):
        c.train(bench.train_stream[0])
    assert files[0].with_name(files[0].name + ".corrupt").is_file()
    assert files[0].is_file() and c.d2l_plugin.dreams_loaded_from_cache == 0
    assert torch.equal(c.d2l_plugin.dream_images, b.d2l_plugin.dream_images)


def test_checkpoint_references_the_cached_dream_set_and_reloads_dreamer_overrides(bench, tmp_path):
    import pickle

    folder = tmp_path / "tiny_dreamer"
    tiny_pixel_dreamer(output_size=16).save_pretrained(folder)
    s = make_d2l(
        str(folder), tmp_path, config=D2LConfig(dreamer_overrides={"num_inference_steps": 1})
    )
    plugin = s.d2l_plugin
    assert plugin.dreamer.config.num_inference_steps == 1
    s.train(bench.train_stream[0])
    blob = pickle.dumps(plugin)
    assert len(blob) < 100_000  # no diffusion weights inside
    d2l_mod._DREAMERS.clear()  # as in a fresh process
    back = pickle.loads(blob)
    assert back._dreams_u8 is None and back._base_dreamer is None  # referenced, not carried
    assert back.dreamer.config.num_inference_steps == 1  # reloaded WITH its overrides
    assert back.dreamer.output_shape == (1, 16, 16)
    assert torch.equal(back.dream_images, plugin.dream_images)
