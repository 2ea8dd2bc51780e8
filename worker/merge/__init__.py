"""The merge pipeline, what turns a spec and its inputs into a merged adapter in a folder:
what the spec gives each module (``module_values``), the plan from headers alone (``plan``),
its memory cost (``memory``), the layer-by-layer run (``runner``, with ``pipeline`` for modules
side by side and ``rank_auto`` for ``output.rank: "auto"``) and the files it writes
(``output``, with the report's ``serving`` section). The CLI and the queue's job function
(``worker.job``) both call :func:`worker.merge.runner.run_merge`; nothing here knows of RQ,
Redis or S3.
"""
