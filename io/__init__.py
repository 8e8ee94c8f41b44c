"""io for gmeta."""
