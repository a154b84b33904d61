"""Property-based suites (hypothesis) that attack deletion safety on real servers."""
