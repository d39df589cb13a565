"""Patches to transformers and PEFT, loaded like the plugins (every file here is passed to `--external_plugins`
and patches on import). They change how fast things run, not what they compute (see each file), except fp8_base.py:
opt-in, it trains on float8-rounded weights."""
