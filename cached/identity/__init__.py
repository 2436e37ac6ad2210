"""Identity and authorisation: the daemon's own Keystone credentials, and who may download."""
