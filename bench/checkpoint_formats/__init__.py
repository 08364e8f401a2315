"""Released checkpoint formats, one module per project; `bench.checkpoints` imports every module here so
that its `register_format` runs. See the README section "Adding a checkpoint format"."""
