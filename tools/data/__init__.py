"""Step 1, prepare: read and check the official lists and images, split train/validation, deal the folds."""
