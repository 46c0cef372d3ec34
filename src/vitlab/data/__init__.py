"""Data: datasets (digits, MNIST-style IDX, CIFAR batches, image folders), decoding, transforms and
augmentation on tensors (no torchvision), mixup/cutmix, repeated-augmentation sampling, loaders."""

from vitlab.data.build import ACCEPTED_FORMS, build_dataset, parse_source
from vitlab.data.dataset import ImageFileDataset, TensorImageDataset, VisionDataset
from vitlab.data.errors import BadImageError, DatasetError
from vitlab.data.image import (
    IMAGE_EXTENSIONS,
    expand_image_paths,
    is_image_file,
    load_image,
    to_channels,
    unique_stems,
)
from vitlab.data.loader import collate_skip_none, create_loader, seed_worker
from vitlab.data.mixup import Mixup, one_hot_smooth
from vitlab.data.randaugment import OPS as RANDAUGMENT_OPS
from vitlab.data.randaugment import RandAugment, apply_op
from vitlab.data.sampler import RepeatAugSampler
from vitlab.data.sources import read_idx
from vitlab.data.splits import stratified_split
from vitlab.data.transforms import (
    EvalTransform,
    RandomErasing,
    TrainTransform,
    eval_transform,
    train_transform,
)

__all__ = [
    "ACCEPTED_FORMS",
    "IMAGE_EXTENSIONS",
    "RANDAUGMENT_OPS",
    "BadImageError",
    "DatasetError",
    "EvalTransform",
    "ImageFileDataset",
    "Mixup",
    "RandAugment",
    "RandomErasing",
    "RepeatAugSampler",
    "TensorImageDataset",
    "TrainTransform",
    "VisionDataset",
    "apply_op",
    "build_dataset",
    "collate_skip_none",
    "create_loader",
    "eval_transform",
    "expand_image_paths",
    "is_image_file",
    "load_image",
    "one_hot_smooth",
    "parse_source",
    "read_idx",
    "seed_worker",
    "stratified_split",
    "to_channels",
    "train_transform",
    "unique_stems",
]
