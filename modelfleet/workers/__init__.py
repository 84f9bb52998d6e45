"""modelfleet's own worker processes."""
