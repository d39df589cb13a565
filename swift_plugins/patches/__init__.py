"""Patches to transformers and PEFT, loaded like the plugins (every file here is passed to `--external_plugins`
and patches on import). They change how fast things run, never what they compute (see each file)."""
