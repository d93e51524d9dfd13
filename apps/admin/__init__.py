"""korinet-admin: a reference app on the KoriNet runtime (see README)."""
