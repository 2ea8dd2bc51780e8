"""Speed benchmark (issue 5): coremerge's spaces and methods against PEFT and the I/O floor.

Entry point: ``.venv/bin/python -m bench.speed.run --help`` (or ``bench/speed/run.py``). The
parent process never imports torch; every timed step is a fresh subprocess:

- ``steps.py``: the engine's public functions called one step at a time on real inputs
  (read, bases, projection, merge, reconstruction, write), for the cost breakdown and the
  scaling curves;
- ``peft_peer.py``: PEFT's ``add_weighted_adapter`` on a Llama skeleton of the same shapes;
- the ``coremerge merge`` CLI and ``bench/_floor.py`` for whole-process rows.
"""
