"""Command-line tools (``python scripts/<tool>.py``); a package so tests import their helpers as ``scripts.<tool>``.

Library code lives in ``model_core``; a script here is a thin ``fire`` entry point over it, or a
tool of its own (servers for tests and benchmarks, DICOM study writers, benchmarks).
"""
