"""cedar: clients package."""
