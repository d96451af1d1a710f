"""Everything the CLI draws for a person (rich tables, progress bars, errors), one module per command.
Services never import this package; it imports services' result models."""
