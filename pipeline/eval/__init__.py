"""``samadapt eval``: interactive protocols (``protocols``), the models compared (``models``),
per-mask scores (``scoring``), the files written (``report``) and the command's library function
(``run.evaluate``)."""
