"""korinet-audio: a reference app on the KoriNet runtime (see README)."""
