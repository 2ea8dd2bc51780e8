"""The benchmark framework: coremerge's CLI against the I/O floor and its peers, with profiles.

Entry point: ``.venv/bin/python -m bench.speed.run --help`` (``--profile speed|engine``). The
parent process never imports torch or the product; every timed step is a fresh subprocess:

- ``coremerge merge`` (the CLI) and ``floor.py`` (the I/O floor) for whole-process rows;
- ``steps.py``: the engine's public functions called one step at a time on real inputs
  (read, bases, projection, merge, reconstruction, write), for the cost breakdown and the
  scaling curves;
- the peers: ``peft_peer.py`` (PEFT's ``add_weighted_adapter`` on a Llama skeleton of the same
  shapes) and ``reference_peer.py`` (the paper's own code, read from a local git mirror).

Modules: ``run.py`` (the CLI), ``profile_speed.py`` and ``profile_engine.py`` (what each
profile runs and checks), ``harness.py`` (child commands, probes, inputs, the record),
``measure.py`` (measured subprocesses), ``machine.py`` (machine description, JSON files),
``workloads.py`` (input sets), ``report.py`` (tables and plots).
"""
