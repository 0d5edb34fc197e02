"""selftune.daemon.http."""
