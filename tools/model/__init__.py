"""Steps 4 and 5, train and score: the checkpoint train.sh keeps, and five-label probabilities from a checkpoint."""
