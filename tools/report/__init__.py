"""Step 7, report: the competition score and its parts, the test-set report, the augmentation ablation."""
