"""The fire-safety fine-tuning pipeline, one sub-package per step (`python -m tools.<step>.<name> --help`):

    data/     1 prepare   check the lists and images, split train/validation, deal the folds
    augment/  2 augment   VL-ADAS copies of the training split, filtered by a model
    compose/  3 compose   each stage's swift JSONL and the manifest
    model/    4-5 train and score: the kept checkpoint, five-label probabilities
    decide/   6 fuse      fusion, its tuning on held-out predictions, the submission and its check
    report/   7 report    the competition score, the test-set report, the augmentation ablation
    demo/     the built-in demo's data and tiny models

task.py (labels, prompt, weights, every path), fileio.py and probs.py (file formats) serve every step.
"""
