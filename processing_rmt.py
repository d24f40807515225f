"""Preprocessing for RMT: a chest X-ray image processor and a processor for image + clinical text pairs.

`RMTImageProcessor` turns one radiograph into a (3, H, W) float32 tensor. The steps are grayscale,
histogram equalization (PIL `ImageOps.equalize`), square resize, optional train-time augmentation,
scaling to [0, 1], replication to three channels and ImageNet normalization. The last two give
ImageNet-pretrained backbones the input layout and range they were trained on.

`RMTProcessor` pairs it with a BERT tokenizer. Either modality may be absent in a row. Absent images
become zero pixel values, absent text becomes the tokenized empty string ([CLS] [SEP]), and
`modality_mask` (B, 2) records which modality is present: column 0 for the image, column 1 for the
text. The model must read `modality_mask`, because the placeholder rows look like ordinary inputs.

This file is carried with checkpoints to the Hugging Face Hub and loaded with `trust_remote_code`,
so it imports only public libraries.
"""

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvF
from transformers import AutoTokenizer, BatchFeature, BertTokenizer, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor, get_size_dict
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import TensorType

# One image: a PIL image, a (H, W) or (H, W, C) array, the path of an image or DICOM file, or a
# pydicom Dataset (typed Any because pydicom is optional).
ImageInput = PIL.Image.Image | np.ndarray | str | os.PathLike | Any

# PIL modes with more than 8 bits per pixel. `Image.convert("L")` clips them to 255 (Pillow 13.0)
# instead of scaling, so they are read as arrays and rescaled by their value range.
_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}

# ITU-R 601-2 luma weights, the ones PIL uses for RGB to "L".
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

# File name extensions read as DICOM. Files without one are recognized by the "DICM" marker that follows
# the 128-byte preamble of a DICOM Part 10 file.
_DICOM_SUFFIXES = {".dcm", ".dicom"}
_DICOM_PREAMBLE_LENGTH = 128
_DICOM_MAGIC = b"DICM"

# Arguments of `from_pretrained` that locate files and that the image processor also needs.
_HUB_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class RMTImagesKwargs(ImagesKwargs, total=False):
    """Keyword arguments of `RMTImageProcessor` on top of the standard image keyword arguments.

    do_augment: apply random rotation, resized crop and contrast jitter.
    rotation_degrees: maximum absolute rotation angle in degrees.
    crop_scale: (min, max) fraction of the image area kept by the random resized crop.
    contrast_jitter: maximum relative contrast change, as in `ColorJitter(contrast=...)`.
    """

    do_augment: bool | None
    rotation_degrees: float | None
    crop_scale: tuple[float, float] | None
    contrast_jitter: float | None


def _open_image_file(path: str | os.PathLike) -> PIL.Image.Image:
    """Read an image file fully into memory, raising ValueError that names the path and the reason."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError as err:
        raise ValueError(f"Image file {str(path)!r} not found.") from err
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"Image file {str(path)!r} is not in an image format PIL can read.") from err
    except (OSError, PIL.Image.DecompressionBombError) as err:
        raise ValueError(f"Image file {str(path)!r} could not be read: {err}") from err


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map a (H, W) integer or float array linearly from [min, max] onto [0, 255] as uint8.

    The observed value range is used rather than the dtype range: 12-bit radiographs are usually
    stored as uint16, and dividing by 65535 would leave them only 16 gray levels. A constant image
    becomes all zeros.
    """
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("Image array contains NaN or infinite values.")
    low = values.min()
    high = values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _array_to_grayscale(array: np.ndarray) -> PIL.Image.Image:
    """Convert a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array to an 8-bit grayscale image.

    uint8 arrays keep their values (color goes through PIL, so they match PIL inputs exactly).
    Other integer and float arrays are converted to luma in float and rescaled by `_rescale_to_uint8`.
    A fourth channel is taken as alpha and dropped.
    """
    if array.size == 0:
        raise ValueError(f"Image array is empty (shape {array.shape}); an absent image is None, not an empty array.")
    is_numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not is_numeric:
        raise ValueError(f"Image array has unsupported dtype {array.dtype}. Expected an integer or float dtype.")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        if array.dtype == np.uint8:
            return PIL.Image.fromarray(array)
        return PIL.Image.fromarray(_rescale_to_uint8(array))
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.dtype == np.uint8:
            return PIL.Image.fromarray(np.ascontiguousarray(array)).convert("L")
        luma = array[..., :3].astype(np.float64) @ _LUMA_WEIGHTS
        return PIL.Image.fromarray(_rescale_to_uint8(luma))
    raise ValueError(
        f"Image array has shape {array.shape}. Expected (H, W) or (H, W, C) with C in 1, 3 or 4 channels last."
    )


def _import_pydicom() -> Any:
    """Import pydicom and its pixel module, or raise ImportError with the pip command that installs it.

    pydicom is imported on first use, inside a try block, so that `trust_remote_code` loading of this file
    does not require it for PNG and JPEG input.
    """
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as err:
        raise ImportError("Reading DICOM images requires pydicom: pip install 'pydicom>=3.0'.") from err
    return pydicom


def _is_dicom_dataset(image: Any) -> bool:
    """Return True for a pydicom Dataset. Without pydicom imported, no object can be one."""
    pydicom = sys.modules.get("pydicom")
    return pydicom is not None and isinstance(image, pydicom.Dataset)


def _is_dicom_path(path: str | os.PathLike) -> bool:
    """Return True for a .dcm or .dicom path, or a readable file with the DICOM Part 10 "DICM" marker."""
    if Path(path).suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            header = handle.read(_DICOM_PREAMBLE_LENGTH + len(_DICOM_MAGIC))
    except OSError:
        return False
    return header[_DICOM_PREAMBLE_LENGTH:] == _DICOM_MAGIC


def _read_dicom_file(path: str | os.PathLike) -> Any:
    """Read a DICOM file with pydicom, raising ValueError that names the path and the reason."""
    pydicom = _import_pydicom()
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as err:
        raise ValueError(f"DICOM file {str(path)!r} not found.") from err
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"DICOM file {str(path)!r} could not be read: {err}") from err


def _has_voi_transform(dataset: Any) -> bool:
    """Return True when the dataset defines a VOI LUT or a window (center and width)."""
    has_window = "WindowCenter" in dataset and "WindowWidth" in dataset
    return bool(dataset.get("VOILUTSequence")) or has_window


def _voi_output_range(dataset: Any, dtype: np.dtype) -> tuple[float, float]:
    """Return the lowest and highest values the modality and VOI transforms produce over all storable values.

    A window maps onto a fixed display range (PS3.3 C.11.2.1.2), and pydicom's `apply_voi_lut` derives
    that range from BitsStored, PixelRepresentation and the rescale. Sending the extreme storable values
    through the same two transforms gives the range without repeating those rules. The display range,
    not the observed one, is mapped onto [0, 255], so a window shows the same gray for the same value in
    every image.
    """
    pixels = _import_pydicom().pixels
    bits_stored = int(dataset.BitsStored)
    if int(dataset.PixelRepresentation) == 0:
        stored_extremes = [0, 2**bits_stored - 1]
    else:
        stored_extremes = [-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1]
    probe = np.array(stored_extremes, dtype=dtype)
    output = pixels.apply_voi_lut(pixels.apply_modality_lut(probe, dataset), dataset)
    return float(output.min()), float(output.max())


def _map_range_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 255] as uint8, clipping values outside. A zero range gives zeros."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _dicom_to_grayscale(dataset: Any, source: str) -> PIL.Image.Image:
    """Convert a single-frame DICOM image to an 8-bit grayscale image in which bright means dense.

    Grayscale images go through the modality transform (Modality LUT or RescaleSlope/RescaleIntercept),
    then the VOI transform (VOI LUT or WindowCenter/WindowWidth, with the VOI LUT preferred when both are
    given, as pydicom does). With a VOI transform its display range becomes [0, 255]. Without one, the
    observed value range does, as for 16-bit PNGs. MONOCHROME1 images, where low values are bright, are
    inverted at the end. Color images (RGB after pydicom's decoding) are converted to luma as arrays are.

    Raises:
        ValueError: missing or undecodable pixel data, or more than one frame. `source` names the input.
    """
    pixels_module = _import_pydicom().pixels
    try:
        pixels = dataset.pixel_array
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, NotImplementedError) as err:
        raise ValueError(f"DICOM image {source} has no decodable pixel data: {err}") from err

    number_of_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if number_of_frames > 1:
        raise ValueError(f"DICOM image {source} has {number_of_frames} frames. Pass a single-frame radiograph.")
    if int(dataset.get("SamplesPerPixel", 1)) > 1:
        return _array_to_grayscale(pixels)

    values = pixels_module.apply_modality_lut(pixels, dataset)
    if _has_voi_transform(dataset):
        values = pixels_module.apply_voi_lut(values, dataset)
        low, high = _voi_output_range(dataset, pixels.dtype)
        gray = _map_range_to_uint8(values, low, high)
    else:
        gray = _rescale_to_uint8(values)

    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray
    return PIL.Image.fromarray(gray)


def load_grayscale_image(image: ImageInput) -> PIL.Image.Image:
    """Load an image from a PIL image, array, file path or pydicom Dataset as an 8-bit grayscale ("L") PIL image.

    DICOM paths (.dcm, .dicom or a file with the DICOM marker) and pydicom Datasets are converted by
    `_dicom_to_grayscale`, which needs pydicom.

    Raises:
        ValueError: the file is missing or unreadable, the array has an unsupported shape or dtype, or the
            DICOM image has no decodable single frame.
        TypeError: `image` is not one of the accepted types.
        ImportError: a DICOM input without pydicom installed.
    """
    if _is_dicom_dataset(image):
        return _dicom_to_grayscale(image, source="given as a pydicom Dataset")
    if isinstance(image, (str, os.PathLike)):
        if _is_dicom_path(image):
            return _dicom_to_grayscale(_read_dicom_file(image), source=f"file {str(image)!r}")
        image = _open_image_file(image)
    if isinstance(image, PIL.Image.Image):
        if image.mode == "L":
            return image
        if image.mode in _HIGH_BIT_DEPTH_MODES:
            return _array_to_grayscale(np.asarray(image))
        return image.convert("L")
    if isinstance(image, np.ndarray):
        return _array_to_grayscale(image)
    raise TypeError(
        f"Unsupported image type {type(image).__name__}. Expected a PIL image, a numpy array, a file path "
        "(str or pathlib.Path) or a pydicom Dataset."
    )


def _convert_tensor(values: torch.Tensor, return_tensors: str | TensorType | None) -> torch.Tensor | np.ndarray:
    """Return `values` as a torch tensor ("pt" or None) or a numpy array ("np")."""
    tensor_type = TensorType(return_tensors) if return_tensors is not None else TensorType.PYTORCH
    if tensor_type == TensorType.PYTORCH:
        return values
    if tensor_type == TensorType.NUMPY:
        return values.numpy()
    raise ValueError(f"return_tensors={return_tensors!r} is not supported. Use 'pt' or 'np'.")


def _is_single_image(images: Any) -> bool:
    """Return True when `images` is one image rather than a list or tuple of images."""
    return not isinstance(images, (list, tuple))


class RMTImageProcessor(BaseImageProcessor):
    r"""Image processor for chest X-rays.

    Per image: grayscale, histogram equalization, resize to `size`, random augmentation when
    `do_augment`, scale to [0, 1], repeat to 3 channels, normalize with `image_mean` / `image_std`.

    Args:
        size (`int`, `(height, width)` or `{"height": int, "width": int}`, defaults to 224):
            output size. An int gives a square.
        resample (`int`, defaults to `PIL.Image.Resampling.BILINEAR`): PIL filter for the resize.
        image_mean (`list[float]`, defaults to the ImageNet mean): per-channel mean of the 3 output channels.
        image_std (`list[float]`, defaults to the ImageNet std): per-channel standard deviation.
        do_augment (`bool`, defaults to False): apply train-time augmentation by default.
        rotation_degrees (`float`, defaults to 10): random rotation within ±`rotation_degrees`, corners filled black.
        crop_scale (`(float, float)`, defaults to (0.85, 1.0)): area fraction range of the random
            resized crop, which is resized back to `size`.
        contrast_jitter (`float`, defaults to 0.2): contrast factor drawn from [1 - c, 1 + c].

    Augmentation draws from torch's global random generator, so `torch.manual_seed` makes it repeatable.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = RMTImagesKwargs

    def __init__(
        self,
        size: int | Sequence[int] | dict[str, int] = 224,
        resample: int = PIL.Image.Resampling.BILINEAR,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        do_augment: bool = False,
        rotation_degrees: float = 10.0,
        crop_scale: Sequence[float] = (0.85, 1.0),
        contrast_jitter: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = self._validate_size(size)
        self.resample = int(resample)
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.do_augment = bool(do_augment)
        self.rotation_degrees = float(rotation_degrees)
        self.crop_scale = [float(value) for value in crop_scale]
        self.contrast_jitter = float(contrast_jitter)
        self._validate_normalization()
        self._validate_augmentation()

    @staticmethod
    def _validate_size(size: int | Sequence[int] | dict[str, int]) -> dict[str, int]:
        """Return `size` as {"height": H, "width": W}, raising ValueError for other layouts."""
        if isinstance(size, Sequence):
            size = tuple(size)
        size_dict = get_size_dict(size, default_to_square=True)
        if set(size_dict) != {"height", "width"}:
            raise ValueError(f"size must be an int, (height, width) or a height/width dict, got {size!r}.")
        if size_dict["height"] <= 0 or size_dict["width"] <= 0:
            raise ValueError(f"size must be positive, got {size_dict}.")
        return {"height": int(size_dict["height"]), "width": int(size_dict["width"])}

    def _validate_normalization(self) -> None:
        """Raise ValueError unless mean and std have 3 entries and std is positive."""
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean and image_std need 3 values (one per output channel), got {self.image_mean} and "
                f"{self.image_std}."
            )
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}.")

    def _validate_augmentation(self) -> None:
        """Raise ValueError for a negative rotation or jitter or a crop scale outside (0, 1]."""
        if self.rotation_degrees < 0:
            raise ValueError(f"rotation_degrees must be >= 0, got {self.rotation_degrees}.")
        if not 0 <= self.contrast_jitter < 1:
            raise ValueError(f"contrast_jitter must be in [0, 1), got {self.contrast_jitter}.")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}.")

    def _build_augmentation(self) -> v2.Compose:
        """Return the random transform applied to a (1, H, W) float image in [0, 1]."""
        output_size = (self.size["height"], self.size["width"])
        return v2.Compose(
            [
                v2.RandomRotation(
                    degrees=self.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0
                ),
                v2.RandomResizedCrop(size=output_size, scale=tuple(self.crop_scale), antialias=True),
                v2.ColorJitter(contrast=self.contrast_jitter),
            ]
        )

    def preprocess_image(self, image: ImageInput, do_augment: bool | None = None) -> torch.Tensor:
        """Preprocess one image into normalized pixel values of shape (3, H, W), float32.

        Raises:
            ValueError: the file is missing or unreadable, or the array has an unsupported shape or dtype.
            TypeError: `image` is not one of the accepted types.
        """
        do_augment = self.do_augment if do_augment is None else do_augment

        grayscale = load_grayscale_image(image)
        equalized = ImageOps.equalize(grayscale)
        resized = equalized.resize(
            (self.size["width"], self.size["height"]), resample=PIL.Image.Resampling(self.resample)
        )

        pixels = tvF.pil_to_tensor(resized).to(torch.float32) / 255.0
        if do_augment:
            pixels = self._build_augmentation()(pixels).clamp(0.0, 1.0)

        pixels = pixels.expand(3, -1, -1)
        return tvF.normalize(pixels, mean=self.image_mean, std=self.image_std)

    def preprocess(
        self,
        images: ImageInput | Sequence[ImageInput],
        do_augment: bool | None = None,
        return_tensors: str | TensorType | None = "pt",
    ) -> BatchFeature:
        """Preprocess one image or a list of images into `pixel_values` of shape (B, 3, H, W), float32.

        Args:
            images: one image or a non-empty list of images (PIL image, array or file path each).
            do_augment: override the instance's `do_augment` for this call.
            return_tensors: "pt" (default) for a torch tensor, "np" for a numpy array.

        Raises:
            ValueError: an empty list, or an image that cannot be read. The message names its index.
            TypeError: an image of an unsupported type. The message names its index and type.
        """
        image_list = [images] if _is_single_image(images) else list(images)
        if not image_list:
            raise ValueError("preprocess received an empty list of images.")

        tensors = []
        for index, image in enumerate(image_list):
            try:
                tensors.append(self.preprocess_image(image, do_augment=do_augment))
            except (TypeError, ValueError) as err:
                raise type(err)(f"Image at index {index}: {err}") from err

        pixel_values = torch.stack(tensors)
        return BatchFeature(data={"pixel_values": _convert_tensor(pixel_values, return_tensors)})


def _load_tokenizer(name_or_path: str | os.PathLike, **tokenizer_kwargs: Any) -> PreTrainedTokenizerBase:
    """Load a tokenizer with AutoTokenizer, or a BertTokenizer from a bare WordPiece `vocab.txt`.

    AutoTokenizer in transformers 5 raises ValueError for a folder that contains only `vocab.txt`,
    such as a downloaded bert-base-chinese vocabulary. So a `.txt` file, or a folder with
    `vocab.txt` but no `tokenizer.json` or `tokenizer_config.json`, is read as a BERT vocabulary.
    """
    path = Path(name_or_path)
    # A bare vocabulary carries no length limit; 512 is the position count of the BERT checkpoints.
    bare_kwargs = {"model_max_length": 512, **tokenizer_kwargs}
    if path.is_file() and path.suffix == ".txt":
        return BertTokenizer(vocab=str(path), **bare_kwargs)
    if path.is_dir():
        has_tokenizer_config = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
        if (path / "vocab.txt").is_file() and not has_tokenizer_config:
            return BertTokenizer(vocab=str(path / "vocab.txt"), **bare_kwargs)
    return AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)


def _as_rows(values: Any) -> list[Any] | None:
    """Return None for an omitted modality, `[values]` for a single item, or the list itself."""
    if values is None:
        return None
    if isinstance(values, (list, tuple)):
        return list(values)
    return [values]


def _is_text_present(text: Any, row: int) -> bool:
    """Return True for a non-blank string and False for None or whitespace only. Raise TypeError otherwise."""
    if text is None:
        return False
    if not isinstance(text, str):
        raise TypeError(f"Text at row {row} has type {type(text).__name__}. Expected str or None.")
    return bool(text.strip())


class RMTProcessor(ProcessorMixin):
    r"""Processor for RMT: an `RMTImageProcessor` for chest X-rays and a BERT tokenizer for clinical text.

    Args:
        image_processor (`RMTImageProcessor`): image pipeline.
        tokenizer (`PreTrainedTokenizerBase`): text tokenizer, usually a `BertTokenizer`.
    """

    def __init__(self, image_processor: RMTImageProcessor, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(image_processor, tokenizer)

    @property
    def model_input_names(self) -> list[str]:
        """Names of the tensors `__call__` returns, all of which the model takes."""
        return ["input_ids", "attention_mask", "pixel_values", "modality_mask"]

    @classmethod
    def from_text_model(
        cls,
        text_model_name_or_path: str | os.PathLike,
        image_size: int = 224,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **image_kwargs: Any,
    ) -> "RMTProcessor":
        """Build a processor from a text model's tokenizer and a default `RMTImageProcessor`.

        Args:
            text_model_name_or_path: Hub id or local folder of the text model, a folder holding only a
                WordPiece `vocab.txt`, or the path of that `vocab.txt`.
            image_size: square output size of the image processor.
            tokenizer_kwargs: extra arguments for the tokenizer, e.g. `{"do_lower_case": False}`.
            image_kwargs: extra arguments for `RMTImageProcessor`.
        """
        tokenizer = _load_tokenizer(text_model_name_or_path, **(tokenizer_kwargs or {}))
        image_processor = RMTImageProcessor(size=image_size, **image_kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "RMTProcessor":
        """Load a processor saved with `save_pretrained`, building the image processor with this module's class.

        `ProcessorMixin.from_pretrained` in transformers 5 loads the image processor through
        `AutoImageProcessor`, which requires `trust_remote_code` whenever the saved config has an
        `auto_map`, even when this class is already imported. Loading it here avoids that. Image
        processor arguments in `kwargs` (e.g. `size=256`) override the saved values.
        """
        if kwargs.get("image_processor") is None:
            image_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in RMTImagesKwargs.__annotations__}
            hub_kwargs = {key: kwargs[key] for key in _HUB_DOWNLOAD_KWARGS if key in kwargs}
            kwargs["image_processor"] = RMTImageProcessor.from_pretrained(
                pretrained_model_name_or_path, **hub_kwargs, **image_kwargs
            )
        # RMT's BERT tokenizers are transformers classes that need none of the checkpoint's code. Left unset,
        # AutoConfig sees the RMT auto_map while resolving the tokenizer and asks on stdin whether to trust it.
        # Pass trust_remote_code=True for a tokenizer whose class is itself remote code.
        kwargs.setdefault("trust_remote_code", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __call__(
        self,
        images: ImageInput | None | Sequence[ImageInput | None] = None,
        text: str | None | Sequence[str | None] = None,
        do_augment: bool | None = None,
        padding: bool | str = True,
        truncation: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | TensorType = "pt",
        return_pixel_values: bool = True,
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """Preprocess a batch of (image, text) rows in which either item may be absent.

        Args:
            images: one image or a list with one image or None per row. Omit it when no row has an image.
            text: one string or a list with one string or None per row. None, "" and whitespace-only
                strings mean the text is absent. Omit it when no row has text.
            do_augment: override the image processor's `do_augment`.
            padding, truncation, max_length: passed to the tokenizer.
            return_tensors: "pt" (default) or "np".
            return_pixel_values: with False, images only mark their rows as present in `modality_mask` and
                are not decoded, e.g. when the model reads their features from an `ImageFeatureCache`.
            tokenizer_kwargs: other tokenizer arguments. `return_token_type_ids` defaults to False,
                so the output contains exactly the four model inputs below.

        Returns:
            `BatchFeature` with
            - input_ids, attention_mask (B, L): absent text rows hold the tokenized empty string.
            - pixel_values (B, 3, H, W) float32: zeros where the image is absent.
            - modality_mask (B, 2) int64: column 0 is 1 where the image is present, column 1 where the text is.

        Raises:
            ValueError: both inputs omitted, lists of different lengths, rows with neither modality
                (the message lists their indices), or an unreadable image (the message names its row and path).
            TypeError: a text that is not a string or an image of an unsupported type.
        """
        image_rows = _as_rows(images)
        text_rows = _as_rows(text)
        image_rows, text_rows = self._align_rows(image_rows, text_rows)

        image_present = [image is not None for image in image_rows]
        text_present = [_is_text_present(row_text, row) for row, row_text in enumerate(text_rows)]
        self._check_rows_have_input(image_present, text_present)

        texts = [row_text if present else "" for row_text, present in zip(text_rows, text_present)]
        tokenizer_kwargs.setdefault("return_token_type_ids", False)
        text_inputs = self.tokenizer(
            texts,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **tokenizer_kwargs,
        )
        modality_mask = torch.tensor(list(zip(image_present, text_present)), dtype=torch.long)

        data = {**text_inputs, "modality_mask": _convert_tensor(modality_mask, return_tensors)}
        if return_pixel_values:
            data["pixel_values"] = _convert_tensor(self._pixel_values(image_rows, do_augment), return_tensors)
        return BatchFeature(data=data)

    @staticmethod
    def _align_rows(
        image_rows: list[Any] | None, text_rows: list[Any] | None
    ) -> tuple[list[Any], list[Any]]:
        """Fill an omitted modality with None rows and check that both lists have the same length."""
        if image_rows is None and text_rows is None:
            raise ValueError("RMTProcessor needs images, text or both, but neither was given.")
        if image_rows is None:
            image_rows = [None] * len(text_rows)
        if text_rows is None:
            text_rows = [None] * len(image_rows)
        if len(image_rows) != len(text_rows):
            raise ValueError(
                f"images has {len(image_rows)} rows but text has {len(text_rows)}. Pass one entry per row, "
                "with None where a modality is absent."
            )
        if not image_rows:
            raise ValueError("RMTProcessor received an empty batch.")
        return image_rows, text_rows

    @staticmethod
    def _check_rows_have_input(image_present: list[bool], text_present: list[bool]) -> None:
        """Raise ValueError naming the rows that have neither an image nor a non-blank text."""
        empty_rows = [row for row, pair in enumerate(zip(image_present, text_present)) if not any(pair)]
        if empty_rows:
            raise ValueError(
                f"Rows {empty_rows} have neither an image nor text. Every row needs at least one modality."
            )

    def _pixel_values(self, image_rows: list[ImageInput | None], do_augment: bool | None) -> torch.Tensor:
        """Return (B, 3, H, W) float32 pixel values with zeros in the rows whose image is None."""
        size = self.image_processor.size
        pixel_values = torch.zeros(len(image_rows), 3, size["height"], size["width"], dtype=torch.float32)
        for row, image in enumerate(image_rows):
            if image is None:
                continue
            try:
                pixel_values[row] = self.image_processor.preprocess_image(image, do_augment=do_augment)
            except (TypeError, ValueError) as err:
                raise type(err)(f"Image at row {row}: {err}") from err
        return pixel_values


RMTImageProcessor.register_for_auto_class("AutoImageProcessor")
RMTProcessor.register_for_auto_class("AutoProcessor")
