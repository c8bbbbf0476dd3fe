"""The ``icl-sam2`` command line and what it starts: the main job (``demo``), the MONAI Label server
(``serve``), reference PACS and DICOM studies, data preparation and exports. The library is ``model_core``;
everything here is a thin layer over it."""
