"""`qwenvl validate-data` and `qwenvl data synth`: reading data files, every check, the report, synthetic data."""
