"""Test helpers shared by several tests/ folders (import as `tests.support.<module>`)."""
