"""Data on disk: atomic writes, gzip compressed in blocks on every core (label files), NIfTI read through
ISA-L (MONAI's LoadImage reader), volume and label checks, datalists and dataset layouts, MONAI transforms
for intensities and labels, and generated phantoms."""
