"""What the tests share (fixtures, engine runs) and the scripts they start as separate processes (workers,
fault injection, state probes)."""
