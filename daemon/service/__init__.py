"""selftune.daemon.service."""
