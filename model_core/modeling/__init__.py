"""The in-context network, as sam2's ``sam2/modeling``: the network, its memories, prompts and inputs,
numerical precision, checkpoint I/O and the presets that build it. Imports nothing of training,
workflows or serving."""
