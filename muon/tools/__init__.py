"""Tools beside the library: nothing on the path of a step imports them.

* `flops`: the FLOP model of a Muon step against AdamW and against training (public as `muon.flops`);
* `profiling`: the profiling harness, op and matmul-FLOP counters under a TorchDispatchMode (public as
  `muon.profiling`; the step engine's op-count gate on host cost and `python -m bench step` use it).

Users reach them by their public names; bench/ and the tests may use either.
"""
