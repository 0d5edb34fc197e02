"""Pure decisions over plain data, the shared frozen records, and the error types.

Nothing here does I/O or reads a clock: callers pass ``now``. Stdlib only.
"""
