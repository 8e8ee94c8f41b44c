"""tools for gmeta."""
