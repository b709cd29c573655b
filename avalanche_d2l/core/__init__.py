"""What every layer uses and that knows no method: the config base (dict round trip, unknown
keys, fingerprint), the atomic write and the set-aside, seeding, and the strategy registry
(names -> factories + metadata; the methods register themselves when their modules are
imported)."""

from avalanche_d2l.core.config import ConfigBase, check_config_keys, dataclass_from_dict, plain
from avalanche_d2l.core.seeding import seed_everything
from avalanche_d2l.core.storage import WriteFailed, atomic_write, set_aside, temporary_name

__all__ = [
    "ConfigBase",
    "WriteFailed",
    "atomic_write",
    "check_config_keys",
    "dataclass_from_dict",
    "plain",
    "seed_everything",
    "set_aside",
    "temporary_name",
]
