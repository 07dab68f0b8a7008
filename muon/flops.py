"""`muon.flops`, the public name of the FLOP model: `muon.tools.flops` (a tool beside the library; the
NS closed forms it re-exports live in `muon.ns_flops`). Kept so that `from muon import flops` and
`muon.flops.overhead(...)` work as documented; nothing is defined here."""

from .tools.flops import *  # noqa: F403
from .tools.flops import __all__  # noqa: F401
