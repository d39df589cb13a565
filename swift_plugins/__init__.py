"""ms-swift plugins for this task, one module per swift registry, loaded with `--external_plugins FILE`."""
