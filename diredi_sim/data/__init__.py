"""Datasets in VOCdevkit layout: real VOC (voc.py), the embedded synthetic set (synthetic.py), class splits."""

# The 20 Pascal VOC classes in the official order. Every model predicts all 20; a split only
# decides which of them are labelled in a customer's data. Labels are 0-based indices here.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
