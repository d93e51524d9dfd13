"""korinet-chat: a reference app on the KoriNet runtime (see README)."""
