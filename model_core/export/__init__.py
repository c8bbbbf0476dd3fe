"""Leaving the project's formats: ONNX export of the single-slice paths and their runtimes, COCO datasets."""
