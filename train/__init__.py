"""Training command lines: thin wrappers over `jspec.training`."""
