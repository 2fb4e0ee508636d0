"""Models: loading with packed attention, the packed forward, tiny local models."""
