"""``python -m avalanche_d2l ...`` (e.g. under ``accelerate launch -m avalanche_d2l run ...``)."""

from avalanche_d2l.cli import entry

raise SystemExit(entry())
