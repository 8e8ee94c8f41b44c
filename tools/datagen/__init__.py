"""``gmeta datagen``: ``generate`` writes a synthetic cold-start dataset with planted structure."""
