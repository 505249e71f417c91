"""The entry layer: the ``samadapt`` command line (``cli.py``) and the root config of a run
(``config.py``), composed from the packages below it (``sharding``, ``pipeline``, ``launch``),
which never import this package."""
