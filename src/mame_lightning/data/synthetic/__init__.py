"""The embedded synthetic default: phantom mammograms, the plan of who gets what, and the DICOM set
written in the VinDr-Mammo and OMI-DB layouts."""
