"""selftune.daemon.cycle."""
