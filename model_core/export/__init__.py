"""Leaving the project's formats and runtimes: ONNX export of the single-slice paths and their runtimes, image
encoders on onnxruntime and OpenVINO behind ``encoder_backend`` (``encoders``, ``encoder_choice``), COCO datasets."""
