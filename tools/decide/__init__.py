"""Step 6, fuse: fusion of the two stages, its parameters tuned on held-out predictions, the submission."""
