"""Measurement tools: each is a script run from the repository root (`python tools/NAME.py --help`).

Product code (train.py, test.py, serve.py, export_safe.py and the library they share) never imports a tool;
tests/test_layout.py checks it."""
