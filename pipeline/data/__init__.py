"""Readers: WebDataset shards -> training/eval batches (``stream``), Zarr volumes -> slice stacks
(``volume``); prompts from masks (``prompts``) and batch collation (``collate``)."""
