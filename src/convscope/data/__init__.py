"""Datasets: the Broden-format reader/writer, the synthetic concept generator, ground truth."""

from convscope.data.broden import (
    BrodenDataset,
    BrodenRow,
    BrodenSample,
    Label,
    broden_collate,
    decode_label_png,
    decode_labels,
    encode_labels,
    save_sample,
    write_broden,
    write_targets,
)
from convscope.data.groundtruth import mask_iou, pointing_game, target_mask, target_masks
from convscope.data.synthetic import SHAPES, SynthConfig, SynthSample, generate, render_sample

__all__ = [
    "SHAPES",
    "BrodenDataset",
    "BrodenRow",
    "BrodenSample",
    "Label",
    "SynthConfig",
    "SynthSample",
    "broden_collate",
    "decode_label_png",
    "decode_labels",
    "encode_labels",
    "generate",
    "mask_iou",
    "pointing_game",
    "render_sample",
    "save_sample",
    "target_mask",
    "target_masks",
    "write_broden",
    "write_targets",
]
