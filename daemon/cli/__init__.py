"""selftune.daemon.cli."""
