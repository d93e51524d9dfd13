"""The korinet-chat plugin: its message types and hooks."""
