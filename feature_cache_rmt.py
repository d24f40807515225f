"""On-disk cache of the pooled CNN features of chest X-rays, so that RMT reads them instead of running its CNN.

`RMTImageEncoder.image_features` maps processed pixels to `(num_image_embeddings, feature_size)` pooled CNN
features per image, and `RMTForMultimodalClassification` accepts them as `image_features` in place of
`pixel_values`. With the CNN in eval mode and the pixels not augmented, an image's features depend only on
the image, the image processor's settings and the CNN weights, so they can be computed once and stored.

When cached features are valid:

- Evaluation of any RMT, because `model.eval()` puts the CNN in eval mode, as when the features were computed.
- Training only with `config.freeze_image_backbone` and batches without augmentation. A trainable CNN
  changes at every step. Augmentation draws a new random view of the image for every batch, and cached
  features, which are computed without augmentation, would replace it.

Layout: `cache_dir/<namespace>/<sha256 of the image content>.safetensors`, one float32 tensor per image. The
namespace is a hash of the image processor's pixel settings and of the CNN (timm model name, number of image
embeddings, sha256 of the backbone's parameters and buffers, timm and torch versions), so a change of any
of them selects another folder. The NOTE on `ImageFeatureCache` names the weight changes `load` cannot see. `namespace.json` in each folder records what it was computed from.
Every file is written to a temporary name and renamed into place, so a reader never sees a partial entry.
Deleting the cache folder, or any file in it, is safe: `load` then raises `FeatureCacheMiss` for the missing
entries, and the next `fill` recomputes them.
"""

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from modeling_rmt import RMTForMultimodalClassification, RMTModel
from processing_rmt import ImageInput, RMTImageProcessor, RMTProcessor, _is_dicom_dataset, load_grayscale_image

FEATURES_KEY = "image_features"
ENTRY_SUFFIX = ".safetensors"
NAMESPACE_RECORD = "namespace.json"
# Hex digits of the namespace hash used as its folder name (128 bits).
NAMESPACE_NAME_LENGTH = 32
# Image processor settings that leave non-augmented pixels unchanged: the augmentation parameters and the
# class metadata, which `save_pretrained` and `from_pretrained` add. Every other setting is part of the namespace.
SETTINGS_WITHOUT_PIXEL_EFFECT = frozenset(
    {
        "do_augment",
        "rotation_degrees",
        "crop_scale",
        "contrast_jitter",
        "auto_map",
        "image_processor_type",
        "processor_class",
    }
)
FILE_READ_CHUNK_BYTES = 1 << 20


class FeatureCacheMiss(KeyError):
    """No valid cache entry for an image under the current processor settings and CNN weights."""

    def __str__(self) -> str:
        # KeyError's own __str__ shows the message in quotes, as if it were a key.
        return str(self.args[0])


def image_content_digest(image: ImageInput) -> str:
    """Return the sha256 hex digest of an image's content, the key of its cache entry.

    A path hashes the file's bytes, so two copies of one file share an entry and a rewritten file gets a new
    one. A PIL image hashes its mode, size, palette and pixel bytes, an array its dtype, shape and bytes, and a
    pydicom Dataset the 8-bit grayscale image it converts to.

    Raises:
        ValueError: a missing or unreadable file, or an array that the image processor rejects.
        TypeError: an input of an unsupported type.
    """
    digest = hashlib.sha256()
    if isinstance(image, (str, os.PathLike)):
        digest.update(b"file\0")
        hash_file(image, digest)
    elif isinstance(image, PIL.Image.Image):
        digest.update(b"pil\0")
        hash_pil_image(image, digest)
    elif isinstance(image, np.ndarray):
        # Raises the image processor's ValueError for an empty array, a bad shape or dtype, or NaN values.
        load_grayscale_image(image)
        digest.update(f"array\0{image.dtype.str}\0{image.shape}\0".encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    elif _is_dicom_dataset(image):
        digest.update(b"dicom\0")
        hash_pil_image(load_grayscale_image(image), digest)
    else:
        raise TypeError(
            f"Unsupported image type {type(image).__name__}. Expected a PIL image, a numpy array, a file path "
            "(str or pathlib.Path) or a pydicom Dataset."
        )
    return digest.hexdigest()


def hash_file(path: str | os.PathLike, digest: "hashlib._Hash") -> None:
    """Feed the bytes of the file at `path` into `digest`. Raise ValueError naming the path if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(FILE_READ_CHUNK_BYTES):
                digest.update(chunk)
    except FileNotFoundError as err:
        raise ValueError(f"Image file {str(path)!r} not found.") from err
    except OSError as err:
        raise ValueError(f"Image file {str(path)!r} could not be read: {err}") from err


def hash_pil_image(image: PIL.Image.Image, digest: "hashlib._Hash") -> None:
    """Feed the mode, size, palette and pixel bytes of a PIL image into `digest`."""
    digest.update(f"{image.mode}\0{image.size}\0".encode())
    palette = image.getpalette()
    if palette is not None:
        digest.update(bytes(palette))
    digest.update(image.tobytes())


def hash_tensors(state: dict[str, torch.Tensor]) -> str:
    """Return the sha256 hex digest of named tensors: names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def pixel_settings(image_processor: RMTImageProcessor) -> dict[str, Any]:
    """Return the image processor's settings that change non-augmented pixels, with its class name."""
    settings = image_processor.to_dict()
    settings = {key: value for key, value in settings.items() if key not in SETTINGS_WITHOUT_PIXEL_EFFECT}
    return {"class": type(image_processor).__name__, **settings}


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(temporary_path)` and rename the result to `path`, so that `path` is never partially written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def describe_image(image: ImageInput, index: int) -> str:
    """Name an image in messages: its path, or its type and index in the given list."""
    if isinstance(image, (str, os.PathLike)):
        return repr(str(image))
    return f"the {type(image).__name__} at index {index}"


class ImageFeatureCache:
    """Pooled CNN features of X-rays, stored on disk and keyed by image content, processor settings and CNN weights.

    Args:
        cache_dir: folder of the cache, created on the first `fill`. Several models and processors can share it,
            because each combination of processor settings and CNN gets its own namespace folder inside.
        model: an `RMTForMultimodalClassification` or `RMTModel`. Its CNN computes the features and its weights
            are part of the key, read again at every call, so entries of changed weights are never returned.
        image_processor: the `RMTImageProcessor`, or an `RMTProcessor` whose image processor is used. Its
            settings are read at every call.

    The features are valid inputs of the model in evaluation, and in training only when
    `config.freeze_image_backbone` is set and the batch is not augmented: see the module docstring.

    NOTE: between two `fill` calls, `load` detects a changed CNN parameter only through its version counter
    (see `parameter_identity`). Writes through `tensor.data` and fused optimizer steps do not bump it, so after
    such a change call `fill`, which hashes every parameter again, before `load`.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        model: RMTForMultimodalClassification | RMTModel,
        image_processor: RMTImageProcessor | RMTProcessor,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise ValueError(f"Image feature cache folder {str(self.cache_dir)!r} exists but is not a folder.")
        self.image_encoder = image_encoder_of(model)
        self.config = model.config
        self.image_processor = getattr(image_processor, "image_processor", image_processor)
        # Duck typing, because `AutoProcessor(..., trust_remote_code=True)` returns classes of a copied module.
        if not callable(getattr(self.image_processor, "preprocess_image", None)):
            raise TypeError(
                "image_processor must be an RMTImageProcessor or an RMTProcessor (from processing_rmt or from "
                f"AutoProcessor), got {type(image_processor).__module__}.{type(image_processor).__name__}."
            )
        # The parameter digest is recomputed only when a parameter was replaced or modified in place.
        self._parameters: list[torch.Tensor] = []
        self._parameter_identity: tuple | None = None
        self._parameter_digest: str | None = None

    @property
    def feature_shape(self) -> tuple[int, int]:
        """`(num_image_embeddings, feature_size)`, the shape of one image's features."""
        return self.config.num_image_embeddings, self.image_encoder.feature_size

    @property
    def namespace_dir(self) -> Path:
        """Folder of the entries that match the current processor settings and CNN weights."""
        namespace = json.dumps(self.namespace(), sort_keys=True, default=str).encode()
        return self.cache_dir / hashlib.sha256(namespace).hexdigest()[:NAMESPACE_NAME_LENGTH]

    def namespace(self) -> dict[str, Any]:
        """Return everything besides the image content that the features depend on."""
        return {
            "image_processor": pixel_settings(self.image_processor),
            "image_model_name": self.config.image_model_name,
            "num_image_embeddings": self.config.num_image_embeddings,
            "backbone_sha256": self.backbone_digest(),
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        }

    def backbone_digest(self, rehash: bool = False) -> str:
        """Return the sha256 of the CNN's state dict: its parameters and its buffers (batch-norm statistics).

        Buffers are hashed at every call, because batch norm updates its running statistics in place without
        bumping their version counters. Parameters are hashed again with `rehash`, or when their identity changed.
        """
        state = self.image_encoder.backbone.state_dict(keep_vars=True)
        parameters = {name: tensor for name, tensor in state.items() if isinstance(tensor, nn.Parameter)}
        buffers = {name: tensor for name, tensor in state.items() if name not in parameters}
        identity = parameter_identity(parameters)
        if rehash or identity is None or identity != self._parameter_identity:
            self._parameter_digest = hash_tensors(parameters)
            self._parameter_identity = identity
            # Holding the tensors keeps their ids from being reused by new tensors, which would fool the identity check.
            self._parameters = list(parameters.values())
        return hashlib.sha256(f"{self._parameter_digest}\0{hash_tensors(buffers)}".encode()).hexdigest()

    def __contains__(self, image: ImageInput | None) -> bool:
        """Return whether a valid entry exists for `image`. An absent image (None) is never cached.

        Raises ValueError or TypeError for an image that cannot be read, as `load` does.
        """
        if image is None:
            return False
        digest = self._digests([image])[0]
        return self._read_entry(self.namespace_dir, digest) is not None

    def fill(
        self,
        images: Iterable[ImageInput],
        batch_size: int = 32,
        device: str | torch.device | None = None,
        show_progress: bool = True,
    ) -> int:
        """Compute and store the features of the images that have no valid entry; return how many were computed.

        Images with the same content are computed once and counted once. The CNN runs in eval mode without
        augmentation and without gradients, `batch_size` images at a time, on `device` (default: where the
        CNN is). The CNN is moved there for the call and back afterwards, and the model's train or eval mode
        is restored.

        Raises:
            ValueError: an absent image (None), or an image that cannot be read or processed. The message names
                its index in `images`.
            TypeError: an image of an unsupported type.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        images = image_list(images)
        digests = self._digests(images)
        self.backbone_digest(rehash=True)
        folder = self.namespace_dir

        pending: dict[str, int] = {}
        checked: set[str] = set()
        for index, digest in enumerate(digests):
            if digest in checked:
                continue
            checked.add(digest)
            if self._read_entry(folder, digest) is None:
                pending[digest] = index
        if not pending:
            return 0

        record = json.dumps(self.namespace(), indent=2, sort_keys=True, default=str).encode()
        write_atomically(folder / NAMESPACE_RECORD, lambda temporary: Path(temporary).write_bytes(record))
        work = list(pending.items())
        progress = tqdm(total=len(work), desc="Caching image features", unit="image", disable=not show_progress)
        with progress, self._backbone_for_inference(device) as run_device:
            for start in range(0, len(work), batch_size):
                chunk = work[start : start + batch_size]
                pixel_values = torch.stack([self._preprocess(images[index], index) for _, index in chunk])
                features = self._compute_features(pixel_values, run_device)
                for (digest, _), image_features in zip(chunk, features):
                    self._write_entry(folder, digest, image_features)
                progress.update(len(chunk))
        return len(work)

    def load(self, images: Iterable[ImageInput]) -> torch.Tensor:
        """Return the cached features of `images`, float32 of shape `(n, num_image_embeddings, feature_size)`.

        Raises:
            KeyError: (`FeatureCacheMiss`) an image has no valid entry. The message names the first such image
                and names `fill` as the call that computes it.
            ValueError, TypeError: as `fill`.
        """
        images = image_list(images)
        digests = self._digests(images)
        folder = self.namespace_dir

        entries: dict[str, torch.Tensor | None] = {}
        for digest in digests:
            if digest not in entries:
                entries[digest] = self._read_entry(folder, digest)
        missing = [index for index, digest in enumerate(digests) if entries[digest] is None]
        if missing:
            first = describe_image(images[missing[0]], missing[0])
            others = f" and {len(missing) - 1} more of the {len(images)} images" if len(missing) > 1 else ""
            raise FeatureCacheMiss(
                f"No valid cached image features for {first}{others} in {folder} (the namespace of the current "
                "image processor settings and CNN weights): the entry is missing or unreadable. Call "
                "ImageFeatureCache.fill with these images first; it recomputes such entries."
            )
        if not images:
            return torch.zeros(0, *self.feature_shape)
        return torch.stack([entries[digest] for digest in digests])

    def _digests(self, images: list[ImageInput]) -> list[str]:
        digests = []
        for index, image in enumerate(images):
            if image is None:
                raise ValueError(
                    f"Image at index {index} is None (an absent image). The cache contains features of present "
                    "images only, so leave absent images out."
                )
            try:
                digests.append(image_content_digest(image))
            except (TypeError, ValueError) as err:
                raise type(err)(f"Image at index {index}: {err}") from err
        return digests

    def _read_entry(self, folder: Path, digest: str) -> torch.Tensor | None:
        """Return an entry's features, or None when it is missing, unreadable, of the wrong shape or dtype, or not finite."""
        try:
            features = load_file(folder / f"{digest}{ENTRY_SUFFIX}").get(FEATURES_KEY)
        except (SafetensorError, OSError):
            return None
        if features is None or features.dtype != torch.float32 or tuple(features.shape) != self.feature_shape:
            return None
        if not torch.isfinite(features).all():
            return None
        return features

    def _write_entry(self, folder: Path, digest: str, features: torch.Tensor) -> None:
        tensors = {FEATURES_KEY: features.contiguous()}
        write_atomically(folder / f"{digest}{ENTRY_SUFFIX}", lambda temporary: save_file(tensors, temporary))

    def _preprocess(self, image: ImageInput, index: int) -> torch.Tensor:
        try:
            return self.image_processor.preprocess_image(image, do_augment=False)
        except (TypeError, ValueError) as err:
            raise type(err)(f"Image at index {index}: {err}") from err

    def _compute_features(self, pixel_values: torch.Tensor, device: torch.device) -> torch.Tensor:
        dtype = next(self.image_encoder.backbone.parameters()).dtype
        with torch.no_grad():
            features = self.image_encoder.image_features(pixel_values.to(device=device, dtype=dtype))
        return features.float().cpu()

    @contextlib.contextmanager
    def _backbone_for_inference(self, device: str | torch.device | None) -> Iterator[torch.device]:
        """Put the image encoder in eval mode on `device`, and restore each module's mode and the device after."""
        encoder = self.image_encoder
        modes = [(module, module.training) for module in encoder.modules()]
        home = next(encoder.backbone.parameters()).device
        target = home if device is None else torch.device(device)
        encoder.eval()
        if target != home:
            encoder.backbone.to(target)
        try:
            yield target
        finally:
            if target != home:
                encoder.backbone.to(home)
            for module, training in modes:
                module.training = training


def image_list(images: Iterable[ImageInput]) -> list[ImageInput]:
    """Return `images` as a list; raise TypeError for one image given in place of a list of them."""
    if isinstance(images, (str, os.PathLike, PIL.Image.Image, np.ndarray)) or _is_dicom_dataset(images):
        raise TypeError(f"Expected a list of images, got one {type(images).__name__}. Wrap it in a list.")
    return list(images)


def image_encoder_of(model: nn.Module) -> nn.Module:
    """Return the `RMTImageEncoder` of an `RMTForMultimodalClassification` or an `RMTModel`."""
    base_model = getattr(model, "base_model", None)
    embeddings = getattr(base_model, "embeddings", None)
    image_encoder = getattr(embeddings, "image_encoder", None)
    if image_encoder is None:
        raise TypeError(f"model must be an RMTForMultimodalClassification or an RMTModel, got {type(model).__name__}.")
    return image_encoder


def parameter_identity(parameters: dict[str, torch.Tensor]) -> tuple | None:
    """Return the ids, storage pointers and version counters of the parameters, or None if they are unknown.

    In-place operations on a parameter (`load_state_dict`, `tensor.add_`, a foreach or for-loop optimizer step)
    bump its version counter, and assigning a new parameter changes its id. Inference-mode tensors have no
    version counter, so their identity is unknown and they are hashed at every call.
    """
    try:
        return tuple(
            (name, id(tensor), tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device, tuple(tensor.shape))
            for name, tensor in sorted(parameters.items())
        )
    except RuntimeError:
        return None


__all__ = ["FeatureCacheMiss", "ImageFeatureCache", "image_content_digest"]
