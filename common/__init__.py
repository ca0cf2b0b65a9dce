"""What `data_prep` and `pipeline` both use: atomic file writes, the launchers' environment variables, logging."""
