"""models for gmeta."""
