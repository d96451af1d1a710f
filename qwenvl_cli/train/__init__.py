"""`qwenvl train`: one module per concern (see docs/architecture.md); `runner.run_training` is the entry."""
