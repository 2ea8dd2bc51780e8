"""The worker side of coremerge: the engine, the adapter format, the runner and the CLI."""
