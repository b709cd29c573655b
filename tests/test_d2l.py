"""D2L: head layout and assignment, anchored dreaming, the learned oracle, the prompt inventory,
the cache, the hosts, end to end through ``D2L(...)``.

CPU only: a tiny random diffusers dreamer (``tiny_models``) for the mechanism through the real
sampling loop, and stand-in dreamers whose images react strongly to their prompt (a random UNet's
untrained cross-attention barely does) for what the objective achieves.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from tiny_models import tiny_pixel_dreamer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from avalanche_d2l import D2L, D2LConfig, D2LPlugin, DreamConfig, DreamHeads
from avalanche_d2l.d2l import plugin as plugin_mod
from avalanche_d2l.d2l import space as space_mod
from avalanche_d2l.d2l.dreaming import DreamJob, dream
from avalanche_d2l.d2l.heads import MASK_VALUE
from avalanche_d2l.d2l.hosts import der_targets
from avalanche_d2l.d2l.oracle import LearnedOracle
from avalanche_d2l.d2l.plugin import greedy_assignment
from avalanche_d2l.d2l.space import infer_input_space
from avalanche_d2l.dreaming.dreamer import DreamerConfig
from avalanche_d2l.models.classifiers import small_cnn
from avalanche_d2l.scenarios import split_digits, tensor_benchmark
from avalanche_d2l.utils import seed_everything


class LinearDreamer(nn.Module):
    """Stand-in dreamer with the Dreamer's interface whose images depend strongly on the prompt:
    ``g = sigmoid(W [p; noise / 10])``; an image-to-image call keeps ``1 - strength`` of its anchor,
    ``x = (1 - s) * anchor + s * g``. Its denoising loss asks ``sigmoid(V p)`` to reproduce the
    images, so textual inversion has something to fit."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = DreamerConfig(
            kind="pixel",
            image_size=16,
            channels=1,
            prompt_len=2,
            prompt_dim=16,
            latent_size=16,
            latent_channels=1,
        )
        self.register_buffer("w", torch.randn(32 + 256, 256, generator=g) / 6)
        self.register_buffer("v", torch.randn(32, 256, generator=g) / 6)
        self.register_buffer("table", torch.randn(6, 2, 16, generator=g))
        self.encoded = []  # what encode() was given (a spy)

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

    def encode(self, images):
        self.encoded.append(images.detach().clone())
        return images * 2 - 1

    def denoising_loss(self, x0, prompt_embeds, *, generator=None, repeats=1):
        recon = torch.sigmoid(prompt_embeds.flatten(1) @ self.v)
        return (recon - (x0.flatten(1).repeat(repeats, 1) + 1) / 2).pow(2).mean(1)

    def generated(self, prompt_embeds, noise):
        z = torch.cat([prompt_embeds.flatten(1), 0.1 * noise.flatten(1)], 1)
        return torch.sigmoid(z @ self.w)

    def sample(self, prompt_embeds, *, noise=None, grad=True, init=None, strength=1.0, **kw):
        if noise is None:
            noise = torch.randn(prompt_embeds.shape[0], 1, 16, 16)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = self.generated(prompt_embeds, noise).view(-1, 1, 16, 16)
            if init is not None:
                x = (1 - strength) * (init + 1) / 2 + strength * x
            return x


@pytest.fixture(scope="module")
def dreamer():
    return tiny_pixel_dreamer(output_size=16)


@pytest.fixture(scope="module")
def bench():
    return split_digits(n_experiences=5, image_size=16, seed=0)


def quiet_evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loss_metrics(epoch=True), loggers=[]
    )


def cfg(**kw) -> DreamConfig:
    base = dict(steps=2, batch_per_class=2, samples_per_class=6, invert_steps=1, progress=False)
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


def stream_tensors(bench, classes):
    batches = [next(iter(DataLoader(e.dataset, batch_size=10_000))) for e in bench.train_stream]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def train_on_classes(model: DreamHeads, bench, classes, steps=60):
    """Assign class c -> head c and fit the wrapped model a little on those classes."""
    model.assign({c: c for c in classes if int(model.class_to_head[c]) < 0})
    x, y = stream_tensors(bench, classes)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_d2l(dreamer, tmp_path, model=None, **kw):
    seed_everything(0)
    model = model if model is not None else small_cnn(10, 1, width=8)
    opt = torch.optim.Adam(model.parameters(), kw.pop("optimizer_lr", 1e-3))
    args = dict(
        model=model,
        optimizer=opt,
        mem_size=40,
        dreamer=dreamer,
        dream=cfg(),
        train_mb_size=32,
        train_epochs=1,
        evaluator=quiet_evaluator(),
        cache_dir=tmp_path / "dreams",
    )
    args.update(kw)
    return D2L(**args)


def plugin_door(plugins, *, wrapped: bool = True) -> Naive:
    """D2L through the plugin door: Naive on a narrow small CNN (seeded as :func:`make_d2l`'s),
    wrapped in DreamHeads by hand or (``wrapped=False``) left to the plugin, with ``plugins``."""
    seed_everything(0)
    net = small_cnn(10, 1, width=8)
    model = DreamHeads(net, n_classes=10, feature_layer="features", input_shape=(1, 16, 16))
    return Naive(
        model=model if wrapped else net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        train_mb_size=32,
        train_epochs=1,
        evaluator=quiet_evaluator(),
        plugins=plugins,
    )


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
# dreaming: image-to-image from buffer images, the prompt objective, the oracle


def test_image_to_image_starts_from_the_anchor_and_gradients_reach_the_prompt(dreamer):
    """The real sampling loop: at a low strength the image stays near its start (the anchor),
    at strength 1 it does not; gradients reach the prompt through the truncated loop only."""
    g = torch.Generator().manual_seed(0)
    anchor = torch.rand(3, 1, 16, 16, generator=g)
    init = dreamer.encode(anchor)
    assert init.shape == (3, 1, 8, 8) and init.min() >= -1 and init.max() <= 1
    prompt = dreamer.random_prompt(3, generator=g).requires_grad_(True)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    near = dreamer.sample(prompt, noise=noise, init=init, strength=0.5)
    far = dreamer.sample(prompt, noise=noise, init=init, strength=1.0, grad=False)
    base = F.interpolate(
        F.interpolate(anchor, size=8, mode="bilinear", antialias=True), size=16, mode="bilinear"
    )
    assert (near - base).abs().mean() < (far - base).abs().mean()
    near.sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(q.grad is None for q in dreamer.parameters())  # frozen dreamer


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_inversion_scores_every_concept_on_the_same_noisy_images_in_few_calls(dreamer):
    """The concept choice of textual inversion: all concepts in one denoiser call per generation
    batch give each concept the loss that a call of its own (the generator re-seeded, so the same
    timesteps and noise) gives, and so the same choice."""
    from avalanche_d2l.d2l.prompts import _invert

    g = _seeded(0)
    x0 = dreamer.encode(torch.rand(3, 1, 16, 16, generator=g))
    concepts = dreamer.concept_embeddings().detach().float()
    with torch.no_grad():
        one_by_one = torch.stack(
            [
                dreamer.denoising_loss(x0, row.expand(3, -1, -1), generator=_seeded(7))
                for row in concepts
            ]
        )
        together = dreamer.denoising_loss(
            x0,
            concepts.repeat_interleave(3, dim=0),
            generator=_seeded(7),
            repeats=len(concepts),
        ).view(len(concepts), 3)
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-6)
    assert one_by_one.mean(1).std() > 0  # the concepts differ: the choice is not a tie
    calls = []
    loss = dreamer.denoising_loss
    dreamer.denoising_loss = lambda *a, **k: calls.append(k["repeats"]) or loss(*a, **k)
    try:
        for per_call in (256, 6):  # all concepts at once, then 2 per call (6 images / 3)
            calls.clear()
            cfg_ = cfg(invert_steps=0, generate_batch_size=per_call)
            p = _invert(dreamer, torch.rand(3, 1, 16, 16, generator=g), cfg_, g)
            assert calls == ([len(concepts)] if per_call == 256 else [2] * (len(concepts) // 2))
            assert any(torch.equal(p, c) for c in concepts)
    finally:
        del dreamer.denoising_loss
    anchors = torch.rand(3, 1, 16, 16, generator=_seeded(1))
    chosen = [
        _invert(dreamer, anchors, cfg(invert_steps=0, generate_batch_size=b), _seeded(5))
        for b in (256, 3)
    ]
    assert torch.equal(chosen[0], chosen[1])  # one concept per call: the same choice


def _jobs(model, dreamer, bench, classes, heads):
    from avalanche_d2l.d2l.inventory import prototypes

    x, y = stream_tensors(bench, classes)
    protos, center = prototypes(model, x, y, classes)
    g = torch.Generator().manual_seed(3)
    return [
        DreamJob(h, c, dreamer.random_prompt(1, generator=g)[0], x[y == c][:16], protos[c], center)
        for c, h in zip(classes, heads)
    ]


def test_prompt_changes_and_the_dream_loss_falls(bench):
    seed_everything(0)
    model = train_on_classes(heads_model(), bench, [0, 1], steps=40)
    dreamer = LinearDreamer()
    jobs = _jobs(model, dreamer, bench, [0, 1], [5, 6])
    start = torch.stack([j.prompt for j in jobs])
    out = dream(
        dreamer=dreamer,
        learner=model,
        jobs=jobs,
        seen_heads=[0, 1],
        config=cfg(steps=20, lr=0.1, stop="fixed"),
        oracle=LearnedOracle(),
    )
    hist = out.history
    assert hist["steps"] == 20 and {s["reason"] for s in hist["stops"].values()} == {"step_cap"}
    assert (out.prompts - start).flatten(1).norm(dim=1).min() > 1e-2  # every prompt moved
    loss = hist["terms"]["loss"]
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4, loss
    # the learner sees each dream as its own class more at the end than at the start
    assert hist["distinctness"][-1] > hist["distinctness"][0]
    assert out.images.shape == (12, 1, 16, 16) and out.labels.tolist() == [5] * 6 + [6] * 6
    assert model.training is False and all(p.requires_grad for p in model.parameters())


def test_dreams_start_from_buffer_images_of_their_source_class(bench, tmp_path):
    """Spy on the dreamer's encoder: every image-to-image start is a buffer image of the class
    the dream grows from, and the inventory holds one prompt per learned class."""
    dreamer = LinearDreamer()
    s = make_d2l(dreamer, tmp_path, dream=cfg(steps=1))
    s.train(bench.train_stream[0])
    buffer = s.replay_plugin.storage_policy.buffer
    bx, by = next(iter(DataLoader(buffer, batch_size=1000)))[:2]
    classes = sorted(int(c) for c in bench.train_stream[0].classes_in_this_experience)
    plugin = s.d2l_plugin
    assert sorted(plugin.inventory.prompts) == [f"c{c}/0" for c in classes]
    assert set(plugin.inventory.origin.values()) == {"inversion"}
    assert dreamer.encoded  # image-to-image, not pure noise
    for batch in dreamer.encoded:
        match = (batch[:, None] == bx[None]).flatten(2).all(2)  # (n, buffer)
        assert match.any(1).all()  # each start is a buffer image
        assert len({int(by[m.nonzero()[0, 0]]) for m in match}) == 1  # of one class per call


def test_learned_oracle_learns_the_rule_and_round_trips():
    oracle = LearnedOracle(min_labels=4, updates=50, seed=0)
    assert (
        oracle.decide(torch.zeros(8)) is False and oracle.stop_probability(torch.zeros(8)) is None
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(40):  # "stop" exactly when the second coordinate is positive
        z = torch.randn(8, generator=g)
        oracle.add(z, bool(z[1] > 0))
    for _ in range(4):
        oracle.update()
    stop, go = torch.zeros(8), torch.zeros(8)
    stop[1], go[1] = 2.0, -2.0
    assert oracle.decide(stop) and not oracle.decide(go)
    back = LearnedOracle()
    back.load_state_dict(oracle.state_dict())
    assert back.stop_probability(stop) == pytest.approx(oracle.stop_probability(stop))
    assert back.digest() == oracle.digest() and pickle.loads(pickle.dumps(oracle)).ready


def test_the_oracle_is_trained_while_dreaming_and_its_stops_differ_from_the_cap(bench):
    seed_everything(0)
    model = train_on_classes(heads_model(), bench, [0, 1, 2, 3], steps=40)
    dreamer = LinearDreamer()
    stops = {}
    for how in ("oracle", "fixed", "rule"):
        jobs = _jobs(model, dreamer, bench, [0, 1, 2, 3], [4, 5, 6, 7])
        oracle = LearnedOracle(min_labels=4, seed=0)
        out = dream(
            dreamer=dreamer,
            learner=model,
            jobs=jobs,
            seen_heads=[0, 1, 2, 3],
            config=cfg(steps=12, lr=0.1, stop=how, oracle_min_labels=4),
            oracle=oracle,
        )
        stops[how] = out.history["stops"]
        if how == "oracle":
            assert oracle.labels and oracle.n_updates > 0  # trained from the rule's labels
            assert sum(oracle.decisions.values()) > 0  # and consulted
        else:
            assert not oracle.labels  # the controls do not train it
    assert {s["reason"] for s in stops["fixed"].values()} == {"step_cap"}
    assert all(s["step"] == 12 for s in stops["fixed"].values())
    assert any(s["reason"] == "oracle" and s["step"] < 12 for s in stops["oracle"].values())
    assert any(s["reason"] == "rule" for s in stops["rule"].values())


def test_rule_stop_goes_back_to_the_prompt_of_the_step_it_labels(bench):
    seed_everything(0)
    model = train_on_classes(heads_model(), bench, [0, 1], steps=40)
    dreamer = LinearDreamer()
    jobs = _jobs(model, dreamer, bench, [0, 1], [5, 6])
    # a rise threshold no step can pass: step 0 is labelled "stop" when step 1 is measured
    out = dream(
        dreamer=dreamer,
        learner=model,
        jobs=jobs,
        seen_heads=[0, 1],
        config=cfg(steps=5, lr=0.1, stop="rule", rule_rise=10.0),
        oracle=LearnedOracle(),
    )
    assert all(
        s == {"step": 1, "reason": "rule", "distinctness": s["distinctness"]}
        for s in out.history["stops"].values()
    )
    assert torch.allclose(out.prompts, torch.stack([j.prompt for j in jobs]))


# ---------------------------------------------------------------------------------------------
# through D2L(...): run, cache, state, hosts


def test_two_experience_run_with_replay_no_nan(bench, dreamer, tmp_path):
    strategy = make_d2l(dreamer, tmp_path)
    plugin = strategy.d2l_plugin
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
        strategy.eval(bench.test_stream[:2])
    model = strategy.model
    classes = [int(c) for e in bench.train_stream[:2] for c in e.classes_in_this_experience]
    assert all(int(model.class_to_head[c]) >= 0 for c in classes)
    # re-dreamed from every class learned so far, each on a free head, never in the buffer
    assert sorted(plugin.inventory.prompts) == sorted(f"c{c}/0" for c in classes)
    free = set(model.free_heads())
    assert set(plugin.dream_labels.tolist()) == set(model.dream_heads.tolist()) <= free
    assert len(set(plugin.dream_labels.tolist())) == 4
    buffer = strategy.replay_plugin.storage_policy.buffer
    assert {int(y) for y in buffer.targets} <= set(classes)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert plugin.history[-1]["experience"] == 1


def test_dream_cache_avoids_redreaming(bench, dreamer, tmp_path, monkeypatch):
    s1 = make_d2l(dreamer, tmp_path)
    s1.train(bench.train_stream[0])
    files = list((tmp_path / "dreams").glob("dreams_exp0_*.pt"))
    assert len(files) == 1
    assert torch.load(files[0], weights_only=True)["images_u8"].dtype == torch.uint8
    assert s1.d2l_plugin.dreams_loaded_from_cache == 0

    def boom(**kw):
        raise AssertionError("dreamed again although the cache matches")

    monkeypatch.setattr(plugin_mod, "dream", boom)
    s2 = make_d2l(dreamer, tmp_path)
    s2.train(bench.train_stream[0])
    assert s2.d2l_plugin.dreams_loaded_from_cache == 1
    assert torch.equal(s1.d2l_plugin.dream_images, s2.d2l_plugin.dream_images)
    assert s2.d2l_plugin.oracle.digest() == s1.d2l_plugin.oracle.digest()
    # other settings -> other key -> dreams again (here: the patched function raises)
    s3 = make_d2l(dreamer, tmp_path, dream=cfg(steps=3))
    with pytest.raises(AssertionError, match="dreamed again"):
        s3.train(bench.train_stream[0])


def test_checkpoint_holds_the_prompt_inventory_and_references_the_cached_images(bench, tmp_path):
    from avalanche_d2l.checkpointing import load_strategy, save_strategy

    folder = tmp_path / "tiny_dreamer"
    tiny_pixel_dreamer(output_size=16).save_pretrained(folder)
    s = make_d2l(
        str(folder), tmp_path, config=D2LConfig(dreamer_overrides={"num_inference_steps": 1})
    )
    plugin = s.d2l_plugin
    s.train(bench.train_stream[0])
    blob = pickle.dumps(plugin)
    assert len(blob) < 100_000  # no diffusion weights, no images inside
    space_mod._DREAMERS.clear()  # as in a fresh process
    back = pickle.loads(blob)
    assert back._dreams_u8 is None and back._base_dreamer is None  # referenced, not carried
    assert back.dreamer.config.num_inference_steps == 1  # reloaded with its overrides
    assert torch.equal(back.dream_images, plugin.dream_images)
    for key, p in plugin.inventory.prompts.items():
        assert torch.equal(back.inventory.prompts[key], p)
    state = plugin.state_dict()
    fresh = D2LPlugin(tiny_pixel_dreamer(output_size=16), cfg())
    fresh.load_state_dict(state)
    assert fresh.inventory.prompts.keys() == plugin.inventory.prompts.keys()
    assert (
        fresh.oracle.digest() == plugin.oracle.digest() and fresh.assignments == plugin.assignments
    )

    ckpt = tmp_path / "ckpt.pkl"
    save_strategy(s, ckpt)
    other, next_exp = load_strategy(make_d2l(str(folder), tmp_path), ckpt)
    assert next_exp == 1
    assert torch.equal(other.model.class_to_head, s.model.class_to_head)
    assert torch.equal(other.d2l_plugin.dream_labels, plugin.dream_labels)
    other.train(bench.train_stream[1])  # the resumed strategy keeps going
    assert len(other.d2l_plugin.assignments) == 2 and len(other.d2l_plugin.inventory.prompts) == 4


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
    assert model.n_out == 2 and model.extra_head is None  # sized from the first experience
    strategy.train(bench.train_stream[0])
    assert model.extra_head.out_features == 10
    opt_ids = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert id(model.extra_head.weight) in opt_ids  # the optimizer covers the new head
    w0 = model.extra_head.weight.detach().clone()
    strategy.train(bench.train_stream[1])
    assert not torch.equal(model.extra_head.weight, w0)
    assert model.forward_heads(torch.rand(3, 1, 16, 16)).shape == (3, 12)


def test_plugin_door_equals_strategy_door(bench, dreamer, tmp_path):
    a = make_d2l(dreamer, tmp_path, cache_dir=None)
    b = plugin_door([ReplayPlugin(mem_size=40), D2LPlugin(dreamer, cfg())])
    # the model left to the plugin to wrap; the replay plugin after D2LPlugin (as Avalanche's
    # Replay puts it): D2LPlugin moves itself after it, so the sleep phase sees the updated buffer
    c = plugin_door([ReplayPlugin(mem_size=40), D2LPlugin(dreamer, cfg())], wrapped=False)
    d = plugin_door([D2LPlugin(dreamer, cfg()), ReplayPlugin(mem_size=40)], wrapped=False)
    for s in (a, b, c, d):
        seed_everything(1)
        s.train(bench.train_stream[0])
    assert isinstance(c.model, DreamHeads) and c.model.feature_layer == "features"
    assert [type(p).__name__ for p in d.plugins[:2]] == ["ReplayPlugin", "D2LPlugin"]
    dreams = a.d2l_plugin.dream_images
    for other in (b, c, d):
        for pa, pb in zip(a.model.parameters(), other.model.parameters(), strict=True):
            assert torch.allclose(pa, pb)
        assert torch.equal(other.model.class_to_head, a.model.class_to_head)
        plugin = next(p for p in other.plugins if isinstance(p, D2LPlugin))
        assert torch.allclose(plugin.dream_images, dreams)  # dreamed from the same buffer


def test_configs_name_the_variants_and_reject_unknown_keys():
    d = DreamConfig()
    assert (d.source, d.prompts, d.labels, d.stop) == (
        "anchored",
        "optimised",
        "new_head",
        "oracle",
    )
    c = D2LConfig()
    assert (c.dreamer, c.n_extra_heads, c.dream.backprop_steps) == ("offline", 0, 2)
    # a nested dream section changes the preset, not DreamConfig()'s own defaults
    e = D2LConfig.from_dict({"dream": {"steps": 3, "source": "interpolation"}, "n_extra_heads": 2})
    assert (e.dream.steps, e.dream.source, e.dream.backprop_steps) == (3, "interpolation", 2)
    assert D2LConfig.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    assert D2LConfig.from_dict({}) == D2LConfig()
    for field, bad in (
        ("source", "dreams"),
        ("prompts", "learned"),
        ("labels", "x"),
        ("stop", "y"),
    ):
        with pytest.raises(ValueError, match=f"DreamConfig.{field} must be one of"):
            DreamConfig(**{field: bad})
    with pytest.raises(ValueError, match="valid keys.*dreamer_overrides"):
        D2LConfig.from_dict({"dreamz": "noise"})
    with pytest.raises(ValueError, match="unknown DreamConfig keys"):
        D2LConfig.from_dict({"dream": {"stepz": 3}})
    with pytest.raises(ValueError, match="strength"):
        DreamConfig(strength=0.0)
    # the previous design's keys still load (older experiment files), mapped or ignored
    with pytest.warns(UserWarning, match="previous D2L design"):
        old = D2LConfig.from_dict({"dreams": "random", "dream": {"oracle_threshold": None}})
    assert old.dream.prompts == "random"
    assert D2LConfig.from_dict({"dreams": "noise"}).dream.source == "noise"
    quiet = D2LConfig.from_dict({"dream": {"progress": False, "micro_batch": 4}})
    assert quiet.fingerprint() == c.fingerprint() and e.fingerprint() != c.fingerprint()


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
# sleep phase and training with dreams


def _dream_head_prob(strategy) -> float:
    """Mean probability the learner gives each dream image's own head (seen + dream heads)."""
    model, plugin = strategy.model, strategy.d2l_plugin
    visible = model.seen_heads() + model.dream_heads.tolist()
    col = {h: i for i, h in enumerate(visible)}
    with torch.no_grad():
        p = model.eval().forward_heads(plugin.dream_images)[:, visible].softmax(1)
    idx = torch.tensor([col[int(h)] for h in plugin.dream_labels])
    return float(p.gather(1, idx[:, None]).mean())


def test_sleep_phase_learns_the_dreams_before_the_next_experience(bench, tmp_path):
    probs, steps = {}, {}
    for epochs in (0, 10):
        s = make_d2l(
            LinearDreamer(),
            tmp_path / f"s{epochs}",
            optimizer_lr=3e-3,
            dream=cfg(steps=1, samples_per_class=16, sleep_epochs=epochs, dreams_per_class=3),
        )
        s.train(bench.train_stream[0])
        probs[epochs] = _dream_head_prob(s)
        steps[epochs] = s.d2l_plugin.history[-1]["sleep_steps"]
    n_dreams = s.d2l_plugin.dream_labels.numel()
    assert n_dreams == 6 * 16  # 2 learned classes x 3 dream classes each
    assert steps[0] == 0 and steps[10] == 10 * -(-n_dreams // 32)
    assert probs[10] > probs[0] + 0.1, probs  # the same dreams, now recognised as their heads


def test_a_config_saved_before_sleep_data_existed_keeps_its_fingerprint():
    old = cfg().to_dict()
    assert "sleep_data" not in old  # at its default it is left out, as in older records
    assert DreamConfig.from_dict(old).fingerprint() == cfg().fingerprint()
    changed = cfg(sleep_data="experience")
    assert DreamConfig.from_dict(changed.to_dict()) == changed
    assert changed.fingerprint() != cfg().fingerprint()


@pytest.mark.parametrize("sleep_data", ["buffer", "experience"])
def test_sleep_minibatches_hold_the_experience_only_when_asked(bench, tmp_path, sleep_data):
    s = make_d2l(
        LinearDreamer(),
        tmp_path,
        mem_size=10,
        dream=cfg(steps=1, samples_per_class=16, sleep_epochs=1, sleep_data=sleep_data),
    )
    seen: list[torch.Tensor] = []
    hook = s.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    s.train(bench.train_stream[0])
    hook.remove()
    plugin = s.d2l_plugin
    sleep_inputs = torch.cat(seen[-plugin.history[-1]["sleep_steps"] :]).flatten(1)
    buffer = torch.stack([x for x, *_ in s.replay_plugin.storage_policy.buffer]).flatten(1)
    exp_x = torch.stack([x for x, *_ in bench.train_stream[0].dataset]).flatten(1)
    # experience samples that the 10-image buffer does not hold
    outside = exp_x[~(torch.cdist(exp_x, buffer).min(1).values < 1e-6)]
    hits = int((torch.cdist(sleep_inputs, outside).min(1).values < 1e-6).sum())
    assert (hits > 0) == (sleep_data == "experience"), hits


def test_train_dream_weight_zero_keeps_dreams_out_of_the_experiences_training(bench, tmp_path):
    added = {}
    for w in (None, 0.0):
        s = make_d2l(
            LinearDreamer(),
            tmp_path / f"w{w}",
            dream=cfg(steps=1, samples_per_class=8, sleep_epochs=1, train_dream_weight=w),
        )
        s.train(bench.train_stream[0])
        assert s.d2l_plugin.history[-1]["sleep_steps"] > 0  # sleep unchanged
        s.loss = torch.zeros(())
        s.d2l_plugin.before_backward(s)
        added[w] = float(s.loss)
    assert added[0.0] == 0.0 and added[None] > 0.1, added


def test_without_a_replay_buffer_there_is_nothing_to_dream_from(bench, dreamer):
    plugin = D2LPlugin(dreamer, cfg(steps=1, sleep_epochs=2))
    with pytest.warns(UserWarning, match="no \\(non-empty\\) replay buffer"):
        plugin_door([plugin]).train(bench.train_stream[0])
    assert plugin.dream_labels is None and not plugin.history


def host_strategy(host: str, dreamer, *, mem_size=40):
    from avalanche.training import DER, ER_ACE

    seed_everything(0)
    net = small_cnn(10, 1, width=8)
    plugin = D2LPlugin(dreamer, cfg(steps=1, samples_per_class=8, sleep_epochs=1))
    strategy = (ER_ACE if host == "er_ace" else DER)(
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
    assert plugin.history[-1]["host"] == host and plugin.history[-1]["sleep_steps"] > 0
    buffer = strategy.storage_policy.buffer
    classes = {int(c) for e in bench.train_stream[:2] for c in e.classes_in_this_experience}
    assert {int(y) for y in buffer.targets} <= classes  # dreams never enter the buffer
    if host == "der":
        assert next(iter(DataLoader(buffer, batch_size=8)))[3].shape[1] == 10  # class space
    acc = strategy.eval(bench.test_stream[:2])["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert acc > 0.6  # 4 classes seen: well above chance (0.25), both experiences learned


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
# forward transfer, any input space, the variants


class PlainCNN(nn.Module):
    """A user's plain CNN: three conv blocks with batch norm, global average pooling, a linear
    head (not one of the package's models)."""

    def __init__(self, channels: int = 1, n_classes: int = 10):
        super().__init__()

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(
            block(channels, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.slow  # the offline glyph dreamer on a 2-experience stream: ~3 min on one core
def test_new_classes_score_above_chance_at_start_after_the_sleep_phase(bench):
    """``D2L(...)`` with its defaults (offline dreamer, anchored dreams, learned oracle) and one
    sleep epoch (the default has none: its dreams train with the next experience, so its forward
    transfer starts at experience 2) on a user's plain CNN: after dreaming from experience 0's
    classes and sleeping on the dreams,
    experience 1's classes land on their dream heads and score above chance before any training
    on them (argmax over all heads); plain ER (same model, buffer, epochs) scores 0 there."""
    from avalanche.training import Replay

    from avalanche_d2l.evaluation import make_evaluator

    at_start = {}
    for name in ("d2l", "replay"):
        seed_everything(0)
        net = PlainCNN()
        ev = make_evaluator(bench, interactive=False, timing=False)
        common = dict(
            model=net,
            optimizer=torch.optim.Adam(net.parameters(), 3e-3),
            mem_size=100,
            train_mb_size=32,
            train_epochs=5,
            evaluator=ev,
        )
        if name == "d2l":
            s = D2L(
                dream=DreamConfig(
                    progress=False, batch_per_class=4, backprop_steps=2, sleep_epochs=1
                ),
                **common,
            )
        else:
            s = Replay(criterion=nn.CrossEntropyLoss(), **common)
        for k, exp in enumerate(bench.train_stream[:2]):
            seed_everything(k)
            s.train(exp)
        fwt = next(m for m in ev.metrics if type(m).__name__ == "ForwardTransferAtStart")
        at_start[name] = fwt.accuracy_at_start[1]
    assert at_start["replay"] == 0.0
    # chance as the lab's forward transfer counts it: a random model's accuracy over the 10
    # output units, 0.1 (measured: 0.22 here, 0.0 for ER)
    assert at_start["d2l"] > 0.1, at_start


@pytest.mark.parametrize(("size", "channels", "normalise"), [(28, 1, False), (32, 3, True)])
def test_dreams_match_a_real_batch_in_dtype_shape_and_value_range(size, channels, normalise):
    bench = _stream(size, channels, normalise)
    exp = bench.train_stream[0]
    space = infer_input_space(exp.dataset)
    assert space.shape == (channels, size, size)
    assert space.mean == ((0.5,) * channels if normalise else None)
    seed_everything(0)
    net = small_cnn(4, channels, width=8)
    # default arguments except the (tiny) dreamer: 8 px grey native images
    s = D2L(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        mem_size=20,
        dreamer=tiny_pixel_dreamer(),
        dream=cfg(steps=1, samples_per_class=4),
        n_extra_heads=2,
        evaluator=quiet_evaluator(),
    )
    s.train(exp)
    real = next(iter(DataLoader(exp.dataset.eval(), batch_size=64)))[0]
    dreams = s.d2l_plugin.dream_images
    assert dreams.dtype == real.dtype and dreams.shape[1:] == real.shape[1:]
    lo, hi = float(real.min()), float(real.max())
    assert (lo, hi) == ((-2.0, 2.0) if normalise else (0.0, 1.0))
    assert lo - 1e-4 <= float(dreams.min()) and float(dreams.max()) <= hi + 1e-4
    assert float(dreams.max()) - float(dreams.min()) > 0.25 * (hi - lo)  # not a constant
    assert s.d2l_plugin.dreamer.output_shape == (channels, size, size)
    assert s.model.extra_head is not None and s.model.extra_head.in_features > 0
    s.train(bench.train_stream[1])


VARIANTS = [
    {"source": "unanchored"},
    {"source": "interpolation"},
    {"source": "noise"},
    {"prompts": "random"},
    {"labels": "source_class"},
    {"stop": "fixed"},
    {"stop": "rule"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_each_variant_runs_through_the_public_constructor(bench, variant, tmp_path):
    dreamer = LinearDreamer()
    s = make_d2l(dreamer, tmp_path, dream=cfg(**variant))
    for exp in bench.train_stream[:2]:
        s.train(exp)
    plugin, model = s.d2l_plugin, s.model
    n = plugin.dream_labels.numel()
    per = 6 if variant.get("source") == "unanchored" else 4  # free heads, or learned classes
    assert n == per * 6 and plugin.dream_images.shape == (n, 1, 16, 16)
    uses_dreamer = variant.get("source") not in ("interpolation", "noise")
    assert bool(dreamer.encoded) == (uses_dreamer and variant.get("source") != "unanchored")
    assert bool(plugin.inventory.prompts) == uses_dreamer
    if variant.get("labels") == "source_class":  # labelled as seen classes, no dream heads
        assert set(plugin.dream_labels.tolist()) <= set(model.seen_heads())
        assert model.dream_heads.numel() == 0
        new = sorted(int(c) for c in bench.train_stream[1].classes_in_this_experience)
        free_before = sorted(set(range(10)) - set(plugin.assignments[0].values()))
        assert plugin.assignments[1] == dict(zip(new, free_before))  # in order: no head reuse
    else:
        assert set(plugin.dream_labels.tolist()) <= set(model.free_heads())
    if variant.get("prompts") == "random":
        assert all(h["steps"] == 0 for h in plugin.history)


def test_stable_diffusion_layout_dreams_through_its_vae(tmp_path):
    """A tiny latent (VAE + UNet) dreamer: anchors go through the VAE's encoder, dreams come back
    through its decoder at the learner's 32 px, 3 channels, normalised."""
    from avalanche_d2l.dreaming.dreamer import Dreamer

    config = DreamerConfig(
        kind="latent",
        image_size=16,
        channels=3,
        prompt_len=2,
        prompt_dim=16,
        latent_channels=4,
        latent_size=8,
        num_inference_steps=2,
    )
    vae = {
        "block_out_channels": (8, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "norm_num_groups": 4,
    }
    from tiny_models import TINY_UNET

    sd = Dreamer.from_config(config, TINY_UNET, vae_config=vae, num_concepts=4)
    calls = []
    encode = sd.vae.encode
    sd.vae.encode = lambda x, **kw: calls.append(x.shape) or encode(x, **kw)
    bench = _stream(32, 3, True)
    net = small_cnn(4, 3, width=8)
    s = D2L(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        mem_size=20,
        dreamer=sd,
        dream=cfg(steps=1, samples_per_class=4),
        n_extra_heads=2,
        evaluator=quiet_evaluator(),
    )
    s.train(bench.train_stream[0])
    assert calls and all(c[1:] == (3, 16, 16) for c in calls)  # native size, RGB
    assert s.d2l_plugin.dream_images.shape[1:] == (3, 32, 32)
