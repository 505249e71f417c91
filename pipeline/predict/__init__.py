"""``samadapt predict``: a trained model on NIfTI files, DICOM series and PNG/JPEG images, labels
written in the input's geometry (``run.py``)."""
