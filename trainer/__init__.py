"""trainer for gmeta."""
