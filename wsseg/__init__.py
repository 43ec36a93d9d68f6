"""wsseg: weakly supervised segmentation, from image tags to pixel labels and trained segmenters."""

__version__ = "0.1.0"
