"""The optimiser schedule of an experiment as an Avalanche plugin."""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from avalanche_d2l.experiments.schema import OptimSpec

__all__ = ["OptimSchedule"]


class OptimSchedule(SupervisedPlugin):
    """Experience 0 trains with ``first``, later experiences with ``later``.

    At the first experience of the ``later`` phase a new ``later`` optimiser over the strategy's
    model replaces ``strategy.optimizer`` when the two differ (a new optimiser class, e.g.
    SGD -> RAdam, cannot be reached by changing hyper-parameters); with ``fresh_each_experience``
    every experience after the first gets a new one (no momentum / Adam state carried across
    experiences, each task trained as in its own run). Otherwise the state is kept, as Avalanche
    does by default. Each experience gets its phase's number of epochs and every epoch its
    learning rate from the milestones. Put it before plugins that read ``strategy.train_epochs``
    in ``before_training_exp``.

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

    def spec(self, experience_index: int) -> OptimSpec:
        return self.first if experience_index == 0 else self.later

    def before_training_exp(self, strategy, **kwargs) -> None:
        k = strategy.experience.current_experience
        phase = "first" if k == 0 else "later"
        switch = phase != self.phase and not self.first.same_optimizer(self.later)
        if switch or (self.fresh_each_experience and k > 0):
            strategy.optimizer = self.spec(k).build(strategy.model.parameters())
        self.phase = phase
        strategy.train_epochs = self.spec(k).epochs

    def before_training_epoch(self, strategy, **kwargs) -> None:
        lr = self.spec(strategy.experience.current_experience).lr_at(
            strategy.clock.train_exp_epochs
        )
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
