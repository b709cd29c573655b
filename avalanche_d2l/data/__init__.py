"""Data files shipped with the package (see ``fg_imagenet_wnids.txt``)."""
