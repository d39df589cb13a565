"""Step 2, augment (VL-ADAS): copies of the training split's images, filtered by a model (docs/augmentation.md)."""
