"""The korinet-audio plugin: its message types and hooks."""
