"""muon's benchmark suite: `python -m bench <command>` from the repository root."""
