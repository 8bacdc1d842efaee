"""cedar: strategies package."""
