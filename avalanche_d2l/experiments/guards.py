"""Training guards: a run whose loss stops being a number ends with one sentence."""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

__all__ = ["FiniteLossGuard", "NonFiniteLoss"]


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite; the run is stopped and not recorded."""


class FiniteLossGuard(SupervisedPlugin, supports_distributed=True):
    """Stops training when the loss is NaN or infinite, naming the experience and the step.

    Without it a diverged run (``lr`` far too large, say) trains on to NaN weights and is reported
    with a chance-level accuracy as if it were a result. The check reads one scalar per step.
    """

    def before_backward(self, strategy, **kwargs):
        loss = strategy.loss
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all()):
            exp = strategy.experience.current_experience
            raise NonFiniteLoss(
                f"the training loss became {float(loss.detach().sum())} in experience {exp}, "
                f"epoch {strategy.clock.train_exp_epochs}, iteration "
                f"{strategy.clock.train_epoch_iterations}: the run was stopped and not recorded; "
                "lower the learning rate (or check the data for NaN values) and run again"
            )
