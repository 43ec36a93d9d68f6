"""Class ids as every label map in wsseg holds them.

0 is background, 1..C the dataset's classes in `data.classes` order, and IGNORE (255)
marks pixels no loss and no metric counts: VOC's object outlines, mine-relations'
unsure pixels, the padding of a training crop. uint8 maps therefore fit 254 classes.
"""

BACKGROUND = 0
IGNORE = 255
