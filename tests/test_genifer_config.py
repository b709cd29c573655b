"""Genifer's nested config: the defaults of the earlier flat config key by key, the dict round
trip, errors that name the key's path, flat keys of earlier files read with a warning, command-line
overrides of nested keys, and a GAN trainer built from its own parts only."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch

from avalanche_d2l.experiments import apply_overrides, load_experiment
from avalanche_d2l.experiments.schema import Experiment
from avalanche_d2l.genifer import GeniferConfig
from avalanche_d2l.genifer.config import RENAMED_KEYS
from avalanche_d2l.models.feature_gan import FeatureGANTrainer

#: ``GeniferConfig().to_dict()`` of the flat config this one replaced (its CPU preset).
FLAT_DEFAULTS = {
    "resolution": None,
    "num_classes": None,
    "z_dim": 64,
    "embed_dim": 32,
    "w_dim": 64,
    "mapping_layers": 2,
    "g_channel_base": 256,
    "g_channel_max": 32,
    "output_activation": "sigmoid",
    "output_range": None,
    "g_family": "stylegan2",
    "d_channels": 64,
    "mbstd_group": 4,
    "d_cmap_dim": None,
    "d_family": "compact",
    "gan_steps_first": 800,
    "gan_steps": 800,
    "gan_stop": "fidelity",
    "gan_min_steps": 100,
    "fidelity_every": 50,
    "fidelity_threshold": 0.85,
    "fidelity_min_delta": 0.01,
    "fidelity_holdout": 0.2,
    "fidelity_probe_steps": 120,
    "measure_fidelity": True,
    "gan_batch_size": 64,
    "g_lr": 0.0025,
    "d_lr": 0.0025,
    "adam_betas": (0.0, 0.99),
    "gan_optimizer_reset": False,
    "r1_gamma": 0.5,
    "r1_interval": 16,
    "r1_lazy_scaling": "interval",
    "ema_kimg": 5.0,
    "ema_rampup": 0.05,
    "ema_ramp_phase": None,
    "g_distill_weight": 10.0,
    "g_distill_std": None,
    "gan_checkpoint_every": 0,
    "augment": {
        "xflip": True,
        "rotate90": True,
        "translate": 0.125,
        "scale_std": 0.2,
        "rotate_max_deg": 180.0,
        "brightness_std": 0.1,
        "contrast_std": 0.5,
        "saturation_std": 1.0,
        "padding_mode": "reflection",
        "aniso_std": 0.0,
        "xfrac_std": 0.0,
        "lumaflip": False,
        "hue_max": 0.0,
        "color_center": 0.5,
    },
    "ada_target": 0.5,
    "ada_p_max": 0.5,
    "ada_interval": 4,
    "ada_kimg": 20.0,
    "ce_weight": 1.0,
    "kd_weight": 3.0,
    "fd_weight": 1.0,
    "fd_distance": "rms",
    "kd_temperature": 1.0,
    "head": "fresh_per_task",
    "head_module": None,
    "teacher_bn": "train",
    "replay_ratio": 1.0,
    "replay_split": None,
    "replay_crop_pad": 2,
    "replay_flip": False,
    "replay_padding": "constant",
    "train_gan_after_last": False,
    "real_cache_mb": 512.0,
    "mixed_precision": "no",
    "seed": 0,
    "progress": True,
}


def _at(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def test_nested_defaults_equal_the_flat_defaults_key_by_key():
    cfg = GeniferConfig()
    for key, value in FLAT_DEFAULTS.items():
        if key == "augment":  # the operations are now one level down
            assert json.loads(json.dumps(cfg.to_dict()["augment"]["ops"])) == value
            continue
        assert _at(cfg, RENAMED_KEYS.get(key, key)) == value, key
    # every flat key has a place, and every nested setting came from a flat key
    leaves = {f"{part}.{name}" for part, d in cfg.to_dict().items() if isinstance(d, dict)
              for name in d if name != "ops"}  # fmt: skip
    # settings the flat config did not have (stop on 3 checks, a probe head on 4x4 cells,
    # distillation on the real images too)
    added_since = {"gan.stop_window", "gan.probe_pool", "replay.kd_real"}
    assert leaves - added_since == {v for v in RENAMED_KEYS.values()}


def test_flat_keys_are_read_into_their_part_with_a_warning_naming_it():
    with pytest.warns(DeprecationWarning, match=r"'gan_steps' -> 'gan.steps'") as record:
        cfg = GeniferConfig.from_dict(FLAT_DEFAULTS)
    assert cfg == GeniferConfig()
    said = " ".join(str(w.message) for w in record)
    assert "'replay_split' -> 'replay.split'" in said and "augment.ops" in said
    assert "replay.kd_real=0.3" in said  # the default those files did not know is named
    changed = GeniferConfig.from_dict({"kd_weight": 2.0, "gan": {"steps": 7}, "gan_steps_first": 5})
    assert (changed.replay.kd_weight, changed.gan.steps, changed.gan.steps_first) == (2.0, 7, 5)


def test_round_trip_through_json_and_fingerprint():
    for cfg in (GeniferConfig(), load_experiment("genifer_cifar100").method_config("genifer")):
        back = GeniferConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and back.fingerprint() == cfg.fingerprint()
    cfg = GeniferConfig()
    assert cfg.fingerprint() == GeniferConfig(progress=False).fingerprint()
    assert cfg.fingerprint() != cfg.merged({"augment": {"ops": {"xflip": False}}}).fingerprint()
    changed = cfg.merged({"gan": {"steps": 3}})  # one setting of a part, the others kept
    assert changed.gan.steps == 3 and changed.gan.steps_first == cfg.gan.steps_first


@pytest.mark.parametrize(
    "section, message",
    [
        ({"gan": {"stepz": 3}}, "unknown key 'gan.stepz'; valid keys of gan: steps_first"),
        ({"augment": {"ops": {"flip": True}}}, "unknown key 'augment.ops.flip'"),
        ({"gann": {}}, "unknown key 'gann'; valid keys: generator, discriminator, gan,"),
        ({"gan": {"steps": 1.5}}, "gan.steps must be a whole number, got 1.5"),
        ({"replay": {"flip": "yes"}}, "replay.flip must be true or false"),
        ({"replay": 3}, "replay must be an object of settings"),
        ({"replay": {"teacher_bn": "frozen"}}, "replay.teacher_bn must be one of"),
        ({"generator": {"output_range": 1.0}}, "generator.output_range must be a list"),
        ({"gan": {"stop_window": 0}}, "gan.stop_window must be >= 1"),
        ({"gan": {"class_weight": -0.5}}, "gan.class_weight must be >= 0"),
        ({"gan": {"stats_weight": -1}}, "gan.stats_weight must be >= 0"),
        ({"gan": {"image_weight": -1}}, "gan.image_weight must be >= 0"),
        ({"gan": {"max_separability": 0.3}}, "gan.max_separability must be between 0.5"),
    ],
)
def test_errors_name_the_key_path(section, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        GeniferConfig.from_dict(section)


def test_command_line_overrides_reach_nested_settings():
    data = json.loads(json.dumps(load_experiment("genifer_cifar100").to_dict()))
    out = apply_overrides(data, [("strategies.genifer.gan.steps", 5)])
    cfg = Experiment.from_dict(out).method_config("genifer")
    assert cfg.gan.steps == 5 and cfg.gan.steps_first == 250_000  # the rest of gan kept
    with pytest.raises(ValueError, match="'gan_steps' is now strategies.genifer.gan.steps"):
        apply_overrides(data, [("strategies.genifer.gan_steps", 5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped files use the nested keys
        for name in ("genifer_cifar100", "genifer_cub200", "split_digits"):
            load_experiment(name).method_config("genifer")


def test_gan_trainer_takes_only_its_own_parts():
    params = set(inspect.signature(FeatureGANTrainer).parameters)
    assert params == {"gan", "discriminator", "augment", "rng", "progress"}
    cfg = GeniferConfig().merged({"discriminator": {"channels": 8}, "augment": {"p_max": 0.3}})
    trainer = FeatureGANTrainer(
        gan=cfg.gan, discriminator=cfg.discriminator, augment=cfg.augment, rng=torch.Generator()
    )
    trainer.build_discriminator((4, 2, 2), 3)
    assert trainer.discriminator.config.channels == 8 and trainer.ada.p_max == 0.3


def _two_class_monitor(generator, rule, keep_best: bool = False):
    """A replay monitor of classes 0 and 1 on dummy real images (the probe is scripted)."""
    from avalanche_d2l.genifer.fidelity import ProbeSettings
    from avalanche_d2l.genifer.monitor import ReplayMonitor

    real = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    return ReplayMonitor(
        generator=generator,
        classifier=torch.nn.Identity(),
        features=None,
        classes=[0, 1],
        replay_classes=[0, 1],
        active=[0, 1],
        real_train=real,
        real_test=real,
        rule=rule,
        settings=ProbeSettings(steps=1),
        seed=0,
        keep_best=keep_best,
    )


def test_keep_best_puts_back_the_generator_of_the_check_whose_worst_class_scored_highest(
    monkeypatch,
):
    import torch

    from avalanche_d2l.genifer import monitor as monitor_mod
    from avalanche_d2l.genifer.monitor import StopRule

    scripted = iter([{0: 0.9, 1: 0.3}, {0: 0.7, 1: 0.6}, {0: 1.0, 1: 0.4}])
    monkeypatch.setattr(monitor_mod, "replay_pool", lambda *a, **k: (None, None))
    monkeypatch.setattr(monitor_mod, "probe_accuracy", lambda *a, **k: next(scripted))
    generator = torch.nn.Linear(2, 2)

    def monitor(keep_best):
        return _two_class_monitor(generator, StopRule(min_steps=0), keep_best=keep_best)

    m, weights = monitor(True), {}
    for step in (50, 100, 150):
        torch.nn.init.constant_(generator.weight, float(step))
        weights[step] = generator.weight.detach().clone()
        assert not m(step)  # never passes 0.85 for every class
    summary = {"steps": 150, "max_steps": 150}
    m.restore_best(summary)
    assert summary["kept_check"] == 100  # worst classes 0.3 / 0.6 / 0.4
    assert torch.equal(generator.weight, weights[100])
    stopped_early = {"steps": 100, "max_steps": 150}
    m.restore_best(stopped_early)  # a phase that passed keeps its generator
    assert "kept_check" not in stopped_early
    scripted = iter([{0: 0.9, 1: 0.3}, {0: 0.7, 1: 0.6}])
    plain = monitor(False)
    for step in (50, 100):
        plain(step)
    summary = {"steps": 100, "max_steps": 100}
    torch.nn.init.constant_(generator.weight, 7.0)
    plain.restore_best(summary)  # off by default: nothing kept
    assert "kept_check" not in summary and float(generator.weight[0, 0]) == 7.0


def test_stop_window_ends_a_phase_on_checks_that_pass_on_average_not_on_one_lucky_check(
    monkeypatch,
):
    import torch

    from avalanche_d2l.genifer import monitor as monitor_mod
    from avalanche_d2l.genifer.monitor import StopRule

    # a lucky check (both classes pass once), then a real plateau above the threshold
    script = [{0: 0.6, 1: 0.5}, {0: 0.9, 1: 0.9}, {0: 0.7, 1: 0.8}, {0: 0.9, 1: 0.9}]
    script += [{0: 0.96, 1: 0.9}, {0: 0.9, 1: 0.95}, {0: 0.9, 1: 0.9}, {0: 0.9, 1: 0.9}]
    monkeypatch.setattr(monitor_mod, "replay_pool", lambda *a, **k: (None, None))

    def first_stop(window: int) -> int | None:
        scripted = iter(script)
        monkeypatch.setattr(monitor_mod, "probe_accuracy", lambda *a, **k: next(scripted))
        rule = StopRule(min_delta=0.5, min_steps=0, window=window)
        m = _two_class_monitor(torch.nn.Linear(2, 2), rule)
        return next((50 * k for k in range(1, len(script) + 1) if m(50 * k)), None)

    assert first_stop(1) == 100  # the lucky second check ends the phase
    # averaged over 3 checks: (0.9 + 0.7 + 0.9) / 3 = 0.83 < 0.85 at 200; all pass from 250 on
    assert first_stop(3) == 250
    assert GeniferConfig().gan.stop_window == 3
    # the earlier rule (one check) round-trips through a record and hashes apart from the default
    earlier = GeniferConfig.from_dict({"gan": {"stop_window": 1}})
    assert GeniferConfig.from_dict(earlier.to_dict()).gan.stop_window == 1
    assert earlier.fingerprint() != GeniferConfig().fingerprint()


def test_max_separability_keeps_a_phase_going_until_the_replay_is_hard_to_tell_from_real(
    monkeypatch,
):
    """Every class passes from the first check on; the separability probe (scripted) falls
    1.0, 0.95, 0.8, 0.7, 0.6. Without ``max_separability`` (the control) the phase ends at the
    second check (the first always improves on nothing); with 0.75 only once a check measures
    0.75 or less (one-check window), and the trace records the figure."""
    import torch

    from avalanche_d2l.genifer import monitor as monitor_mod
    from avalanche_d2l.genifer.monitor import StopRule

    monkeypatch.setattr(monitor_mod, "replay_pool", lambda *a, **k: (None, None))
    monkeypatch.setattr(monitor_mod, "probe_accuracy", lambda *a, **k: {0: 0.95, 1: 0.95})

    def first_stop(max_sep: float | None) -> tuple[int | None, object]:
        seps = iter([1.0, 0.95, 0.8, 0.7, 0.6])
        monkeypatch.setattr(monitor_mod, "replay_separability", lambda *a, **k: next(seps))
        rule = StopRule(min_delta=1.0, min_steps=0, max_separability=max_sep)
        m = _two_class_monitor(torch.nn.Linear(2, 2), rule)
        stop = next((50 * k for k in range(1, 6) if m(50 * k)), None)
        return stop, m.trace

    stop, trace = first_stop(None)
    assert stop == 100 and "separability" not in trace[0]
    stop, trace = first_stop(0.75)
    assert stop == 200 and [t["separability"] for t in trace] == [1.0, 0.95, 0.8, 0.7]
    assert GeniferConfig().gan.max_separability is None
    asked = GeniferConfig.from_dict({"gan": {"max_separability": 0.75}})
    assert asked.fingerprint() != GeniferConfig().fingerprint()
