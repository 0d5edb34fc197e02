"""selftune.learners."""
