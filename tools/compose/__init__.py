"""Step 3, compose: each stage's training rows as swift JSONL, and the manifest of what data-pre.sh prepared."""
