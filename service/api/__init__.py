"""The HTTP layer: thin route modules (``merges``, ``health``), their dependencies (``deps``)
and response models (``models``)."""
