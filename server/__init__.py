"""cedar: server package."""
