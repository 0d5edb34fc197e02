"""selftune.daemon.reports."""
