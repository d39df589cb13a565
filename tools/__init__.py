"""Command-line tools of the fire-safety fine-tuning pipeline (`python -m tools.<name> --help`)."""
