"""``fruit-archive``: package a training run into a versioned ``fruit.mar``."""
