"""Write phantom volumes as NIfTI files with an MSD-style datalist (the bundle's built-in data).

    python scripts/make_phantom_dataset.py --output_dir bundle/data/phantoms --train 8 --validation 2 --test 2

Each case is ``caseNNN_image.nii.gz`` (float32 intensities in [0, 1], 1 mm voxels,
axial slices along the third axis) and ``caseNNN_label.nii.gz`` (uint8: 1 blob,
2 tube, 3 block); see :func:`model_core.io.phantoms.write_phantom_dataset`, which this calls.
"""

from __future__ import annotations

import fire

from model_core.io.phantoms import write_phantom_dataset

make_dataset = write_phantom_dataset  # the name scripts/run_bundle_demo.py imports

if __name__ == "__main__":
    fire.Fire(write_phantom_dataset, serialize=lambda p: print(p))
