"""`muon.profiling`, the public name of the profiling harness: `muon.tools.profiling` (a tool beside
the library). Kept so that `from muon.profiling import count_dispatched_ops` works as documented;
nothing is defined here."""

from .tools.profiling import *  # noqa: F403
from .tools.profiling import __all__  # noqa: F401
