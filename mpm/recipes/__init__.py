"""Training recipes, one readable file each (no Trainer class)."""
