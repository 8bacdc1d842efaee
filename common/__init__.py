"""cedar: common package."""
