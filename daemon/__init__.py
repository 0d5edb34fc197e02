"""selftune.daemon."""
