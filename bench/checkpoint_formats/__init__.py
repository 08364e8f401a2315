"""Released checkpoint formats, one module per project; `bench.checkpoints` imports every module here so
that its `register_format` runs. See docs/adding-a-checkpoint-format.md."""
