"""Helpers that start real third-party servers for tests."""
