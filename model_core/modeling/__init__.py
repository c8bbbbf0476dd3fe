"""The in-context network, as sam2's ``sam2/modeling``: the network, its memories, prompts and inputs,
numerical precision, image-encoder backends (``encoders``: the seam; the exported runtimes live in
``model_core.export``), compilation, checkpoint I/O and the presets that build it. Imports nothing of
training, workflows, serving or export."""
