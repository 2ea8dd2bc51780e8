"""The worker side of coremerge: the engine, the adapter format, the runner and the CLI."""

from worker.threads import tune_openmp

# Before anything imports torch: OpenMP reads its settings once (see worker/threads.py).
tune_openmp()
