"""Implementations of the backend interface (carsvc/domain/backend.py).

`memory`: everything in this process, with the SQLite journal under
--data-dir (the default). See docs/architecture.md, "Backends"."""
