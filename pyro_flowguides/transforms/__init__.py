"""Flow layers."""
