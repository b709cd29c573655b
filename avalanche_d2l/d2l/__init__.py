"""D2L -- Dream2Learn: dream classes grown from learned classes by a frozen diffusion model.

Read the method in two files: :mod:`.plugin` (the hooks in run order, the sleep phase, the head
assignment) and :mod:`.dreaming` (the prompt loop, numbered steps). Around them: :mod:`.jobs`
(what the loop works on and returns), :mod:`.config` (settings), :mod:`.oracle` (the learned
stop network), :mod:`.inventory` (the prompt inventory, the method's state), :mod:`.prompts`
(where prompts start; dreams without a dreamer), :mod:`.heads` (the head layout, wrapping a
user's classifier, the head assignment's matching), :mod:`.hosts` (ER / ER-ACE / DER++),
:mod:`.space` (sizing to the data, once), :mod:`.state` (the dreamer, the dream set and the
plugin's saved state), :mod:`.cache` (the dream-set cache and its key) and :mod:`.strategy`
(``D2L`` and the registry's ``d2l``, ``er_ace_d2l``, ``der_d2l``).
"""

from .config import D2LConfig, DreamConfig
from .heads import DreamHeads
from .oracle import LearnedOracle
from .plugin import D2LPlugin
from .strategy import D2L

__all__ = ["D2L", "D2LConfig", "D2LPlugin", "DreamConfig", "DreamHeads", "LearnedOracle"]
