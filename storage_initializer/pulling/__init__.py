"""The parts of one pull, one job per module; ``storage_initializer.pull`` is the entry point.

* :mod:`.published` — what is already on the volume, and handing a complete model to DEST.
* :mod:`.one` — one pull into one cache or destination: fast path, then claim or wait.
* :mod:`.claim` — waiting for, or claiming, the entry's lease.
* :mod:`.holder` — the lease holder: runs the pipeline, releases the lease, cleans up.
* :mod:`.pipeline` — the holder's steps: list → select → plan → transfer → extract → commit.
* :mod:`.staged` — reuse of staged and on-volume files, and the single-archive extraction.
* :mod:`.outcome` — the result of a pull, and what a failed one reports.
* :mod:`.pvc` — legacy ``pvc://`` sources, linked rather than downloaded.
"""
