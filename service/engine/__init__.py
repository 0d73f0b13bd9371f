"""Analysis engine: pure computation, no I/O beyond the bundled model tables."""
