"""Facts about the model that every stage shares: classes, tensor signature, preprocessing.

This module imports nothing heavy: the inference path (classify, info) uses it without torch.
"""

# Fashion-MNIST's classes, in label order (the tutorial's list).
CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASSES)

# Input: what torchvision's ToTensor gives for a 28x28 grayscale image, batched.
IMAGE_SIZE = 28
INPUT_NAME = "input"
INPUT_SHAPE = ("batch", 1, IMAGE_SIZE, IMAGE_SIZE)
OUTPUT_NAME = "logits"
OUTPUT_SHAPE = ("batch", NUM_CLASSES)
# --invert: whether an image is made light-on-dark first (auto: when its border is light, like a product photo)
INVERT_MODES = ("auto", "yes", "no")
PREPROCESSING = (
    "grayscale 28x28 (aspect kept, padded), float32 scaled to [0, 1], "
    "light garment on dark background (Fashion-MNIST polarity)"
)

# train's files in its --out-dir: written by train.py, checked by the CLI before torch is imported (seconds)
TRAIN_OUTPUTS = ("model.pth", "metrics.json", "training_curves.png")
TRAIN_CHECKPOINT = "checkpoint.pt"

# Multiply-adds of one forward pass, counted as 2 FLOP each: 784*512 + 512*512 + 512*10.
FLOPS_PER_IMAGE = 2 * (784 * 512 + 512 * 512 + 512 * 10)


def class_folder_name(name: str) -> str:
    """A class name as a folder name (ImageFolder layout): '/' cannot appear in a path component."""
    return name.replace("/", "-")
