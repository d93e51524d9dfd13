"""The korinet-admin plugin: its message types and hooks."""
