"""The optimiser schedule of an experiment as an Avalanche plugin: torch's ``MultiStepLR`` stepped
by Avalanche's ``LRSchedulerPlugin``, plus the one thing neither does, a different optimiser after
experience 0."""

from __future__ import annotations

from bisect import bisect_right

from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import LRSchedulerPlugin
from torch.optim.lr_scheduler import MultiStepLR

from avalanche_d2l.experiments.schema import OptimSpec

__all__ = ["OptimSchedule"]


class _MultiStepLR(MultiStepLR):
    """torch's ``MultiStepLR`` with each epoch's rate in closed form, ``base * gamma ** (number
    of milestones passed)`` (:meth:`OptimSpec.lr_at`). torch multiplies the previous rate by
    ``gamma`` at each milestone; for many (lr, gamma) pairs that product differs from the closed
    form in the last bit, which would change the results of runs already recorded."""

    def get_lr(self) -> list[float]:
        milestones = sorted(self.milestones.elements())
        passed = bisect_right(milestones, self.last_epoch)
        return [base * self.gamma**passed for base in self.base_lrs]


class OptimSchedule(SupervisedPlugin, supports_distributed=True):
    """Experience 0 trains with ``first``, later experiences with ``later``.

    At the first experience of the ``later`` phase a new ``later`` optimiser over the strategy's
    model replaces ``strategy.optimizer`` when the two differ (a new optimiser class, e.g.
    SGD -> RAdam, cannot be reached by changing hyper-parameters); with ``fresh_each_experience``
    every experience after the first gets a new one (no momentum / Adam state carried across
    experiences, each task trained as in its own run). Otherwise the state is kept, as Avalanche
    does by default. Each experience gets its phase's number of epochs.

    The learning rate within an experience is torch's ``MultiStepLR`` (the phase's ``milestones``
    and ``gamma``, rates in closed form) stepped after every epoch by Avalanche's
    ``LRSchedulerPlugin``, which also puts the base rate back at the end of each experience. This
    plugin holds that scheduler plugin and forwards its hooks: a new scheduler is made at the
    start of every experience, over the optimiser that experience trains with. Put it before
    plugins that read ``strategy.train_epochs`` in ``before_training_exp``.

    Args:
        first: optimiser of experience 0 (``strategy.optimizer`` must be built from it).
        later: optimiser of the other experiences (default: ``first``).
        fresh_each_experience: build a new optimiser at the start of every later experience.
    """

    def __init__(
        self,
        *,
        first: OptimSpec,
        later: OptimSpec | None = None,
        fresh_each_experience: bool = False,
    ):
        super().__init__()
        self.first = first
        self.later = later or first
        self.fresh_each_experience = fresh_each_experience
        self.phase = "first"  # the phase strategy.optimizer was built for
        self.lr_plugin: LRSchedulerPlugin | None = None

    def spec(self, experience_index: int) -> OptimSpec:
        return self.first if experience_index == 0 else self.later

    def before_training_exp(self, strategy, **kwargs) -> None:
        k = strategy.experience.current_experience
        phase = "first" if k == 0 else "later"
        spec = self.spec(k)
        switch = phase != self.phase and not self.first.same_optimizer(self.later)
        if switch or (self.fresh_each_experience and k > 0):
            strategy.optimizer = spec.build(strategy.model.parameters())
        self.phase = phase
        strategy.train_epochs = spec.epochs
        # a scheduler per experience: the optimiser may be new, and the phase's rate applies
        self.lr_plugin = self._lr_plugin(strategy.optimizer, spec)
        self.lr_plugin.before_training_exp(strategy, **kwargs)

    @staticmethod
    def _lr_plugin(optimizer, spec: OptimSpec) -> LRSchedulerPlugin:
        # the phase's base rate (MultiStepLR would keep an earlier scheduler's "initial_lr")
        for group in optimizer.param_groups:
            group["lr"] = spec.lr
            group["initial_lr"] = spec.lr
        scheduler = _MultiStepLR(optimizer, milestones=list(spec.milestones), gamma=spec.gamma)
        return LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True)

    def after_training_epoch(self, strategy, **kwargs) -> None:
        if self.lr_plugin is not None:
            self.lr_plugin.after_training_epoch(strategy, **kwargs)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.lr_plugin is not None:
            self.lr_plugin.after_training_exp(strategy, **kwargs)
