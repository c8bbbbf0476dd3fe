"""Data on disk: atomic writes, volume and label checks, datalists and dataset layouts, MONAI transforms
for intensities and labels, and generated phantoms."""
