"""Training data: subject and class images, VAE latents and prompt conditioning.

Images are resized and cropped once (the crop is drawn from a seeded generator), so that the
cached-latents path and the encode-every-step path see the same pixels. Two augmentations draw
per image per step from the training generator (checkpointed, so a resumed run draws the same):
`training.randomFlip` mirrors an image half the time (with the latent cache, the cache holds
each photo and its mirror image), and `training.cropEachStep` crops each photo anew every step
(only without the latent cache, which encodes one crop per photo). Data order comes from
`ShuffledOrder`, a pure function of (seed, position): resuming needs only the position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image, ImageOps
from transformers import CLIPTextModel, CLIPTokenizer

from dreambooth_contract.api import TrainingSpec
from dreambooth_contract.subjects import ClassSet, Subject, classes_of, subjects_of
from dreambooth_contract.trainer_config import ConfigError, TrainerConfig

from .captions import prompt_for, read_captions
from .dataset_check import IMAGE_SUFFIXES, list_images, no_images, opened_image
from .locations import fetch_dir, store_for
from .seeds import derive_seed

VAE_ENCODE_BATCH = 8


# -- images ----------------------------------------------------------------------------------------


def load_rgb(path: Path, field: str, advice: str = "replace or remove it") -> Image.Image:
    """Decode `path` whole, now: a corrupt, truncated or oversized file is bad input (ConfigError
    naming `field` and the file), not a crash on every restart."""
    with opened_image(path, field, advice) as image:
        image.load()
        # Phone photos store their orientation in EXIF; apply it or subjects lie on their side.
        return ImageOps.exif_transpose(image).convert("RGB")


def resized_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, scale to [-1, 1]: [3, H, W], uncropped."""
    scale = resolution / min(image.size)
    size = (
        max(resolution, round(image.width * scale)),
        max(resolution, round(image.height * scale)),
    )
    image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def square_crop(pixels: torch.Tensor, left: int, top: int) -> torch.Tensor:
    side = min(pixels.shape[1:])
    return pixels[:, top : top + side, left : left + side]


def crop_spare(pixels: torch.Tensor) -> tuple[int, int]:
    """How far a square crop of `pixels` can move: (horizontally, vertically)."""
    height, width = pixels.shape[1:]
    side = min(height, width)
    return width - side, height - side


# A photo's size before the resize (height, width) and its crop's (top, left) in the resized
# photo: what SDXL's micro-conditioning (models/sdxl.py) tells the UNet.
PhotoGeometry = tuple[tuple[int, int], tuple[int, int]]


def to_training_tensor(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    generator: torch.Generator,
    geometry: list[PhotoGeometry] | None = None,
) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, scale to [-1, 1]: [3, H, W].
    `geometry`, when given, receives the photo's original size and crop offsets."""
    pixels = resized_tensor(image, resolution)
    spare_x, spare_y = crop_spare(pixels)
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    if geometry is not None:
        geometry.append(((image.height, image.width), (top, left)))
    return square_crop(pixels, left, top).contiguous()


def load_training_images(
    paths: list[Path],
    resolution: int,
    center_crop: bool,
    seed: int,
    field: str,
    advice: str = "replace or remove it",
    geometry: list[PhotoGeometry] | None = None,
) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1]; random crops depend only on `seed`. A bad file is a ConfigError
    naming `field` (see load_rgb). `geometry` receives each photo's (see to_training_tensor)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            to_training_tensor(
                load_rgb(p, field, advice), resolution, center_crop, generator, geometry
            )
            for p in paths
        ]
    )


def image_name(index: int) -> str:
    """The file name of generated class image `index` in its set."""
    return f"class-{index:06d}.png"


@dataclass(frozen=True)
class ClassImagePlan:
    """A job's class set: the names of the user's images it takes, and how many to generate."""

    supplied: list[str]
    generated: int


def class_image_plan(config: TrainerConfig, class_set: ClassSet) -> ClassImagePlan:
    """Up to numClassImages of the user's class images, and the shortfall: from a listing of
    classImagesUri (the priors pods need only the count; training downloads the images)."""
    priors = class_set.priors
    wanted = priors.num_class_images
    uri = priors.class_images_uri
    if uri is None:
        return ClassImagePlan([], wanted)
    listed = store_for(uri, config.s3).list()
    # The directory's own images, as list_images takes them: no subdirectories.
    names = sorted(
        info.key
        for info in listed
        if "/" not in info.key and Path(info.key).suffix.lower() in IMAGE_SUFFIXES
    )[:wanted]
    if not names:
        raise no_images(class_set.images_field, uri)
    return ClassImagePlan(names, wanted - len(names))


# -- order -----------------------------------------------------------------------------------------


class ShuffledOrder:
    """An endless stream of dataset indices: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("cannot draw from an empty dataset")
        self.size = size
        self.seed = seed

    def take(self, start: int, count: int) -> list[int]:
        """Indices at stream positions [start, start + count)."""
        return [
            self._permutation(p // self.size)[p % self.size] for p in range(start, start + count)
        ]

    @lru_cache(maxsize=4)  # noqa: B019 - tiny, and orders live as long as the trainer
    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.size, generator=generator).tolist()


# -- latents ---------------------------------------------------------------------------------------


@torch.no_grad()
def encode_distribution(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Mean and log-variance of the VAE posterior ([N, 2C, h, w], float32, contiguous)."""
    parameters = [
        vae.encode(encoder_input(vae, chunk)).latent_dist.parameters.float()
        for chunk in pixels.split(VAE_ENCODE_BATCH)
    ]
    return torch.cat(parameters).contiguous()


def encoder_input(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """`pixels` where and as the encoder's first layer takes them, and on a CPU in channels_last:
    oneDNN's convolutions run faster on NHWC input (one Xeon core: the tiny VAE's encode 25 %,
    SD's VAE at 256 px 5 to 10 %; bench/README.md "Step overhead"). The posterior differs from
    NCHW's by float rounding only."""
    # That layer's weight is what diffusers' vae.device and vae.dtype report, after a walk over
    # every submodule (0.8 ms per step for the tiny VAE's two, with the latent cache off).
    weight = vae.encoder.conv_in.weight
    pixels = pixels.to(weight.device, weight.dtype)
    if weight.device.type == "cpu":
        return pixels.contiguous(memory_format=torch.channels_last)
    return pixels


def sample_latents(
    parameters: torch.Tensor,
    vae: AutoencoderKL,
    generator: torch.Generator,
    parts: Sequence[int] = (),
) -> torch.Tensor:
    """Draw from the posterior with our generator (on the CPU: the same draw on any device).

    `parts` splits the rows into consecutive groups whose noise is drawn group after group: the
    numbers sampling each group alone would use. One draw over all rows gives other numbers
    unless a group's size is a multiple of 16 (torch's CPU normal sampler works in blocks of 16).
    """
    distribution = DiagonalGaussianDistribution(parameters)
    row_shape = distribution.mean.shape[1:]
    draws = parts or [len(parameters)]
    noise = torch.cat([torch.randn((rows, *row_shape), generator=generator) for rows in draws])
    latents = distribution.mean + distribution.std * noise.to(parameters.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@dataclass(frozen=True)
class Augmentation:
    """What changes a photo from step to step (training.randomFlip, training.cropEachStep)."""

    flip: bool = False
    crop_each_step: bool = False

    @classmethod
    def of(cls, training: TrainingSpec) -> Augmentation:
        return cls(training.random_flip, training.crop_each_step)

    def flips(self, count: int, generator: torch.Generator) -> torch.Tensor | None:
        """Which of `count` images to mirror this step; None when flipping is off (no draw)."""
        if not self.flip:
            return None
        return torch.rand(count, generator=generator) < 0.5


class LatentSource(ABC):
    """Scaled VAE latents of dataset images, sampled from the encoder's distribution.

    One source holds every image of the data (the instance images, then the class images), so
    that a step that encodes its images does so in one VAE call; a subset's images are a range
    of it (`LatentRange`)."""

    def __init__(self, vae: AutoencoderKL, augmentation: Augmentation):
        self.vae = vae
        self.augmentation = augmentation

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def posterior(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """Mean and log-variance of the images `indices` ([N, 2C, h, w], float32), each as
        this step's augmentation (drawn from `generator`) makes it."""

    def sample(
        self, indices: list[int], generator: torch.Generator, parts: Sequence[int] = ()
    ) -> torch.Tensor:
        """Latents of the images `indices`; `parts` as in `sample_latents`."""
        return sample_latents(self.posterior(indices, generator), self.vae, generator, parts)


class CachedLatents(LatentSource):
    """Encode every image once (and its mirror image, when flips are on); each step only
    samples (the speed-up for frozen VAEs)."""

    def __init__(
        self,
        vae: AutoencoderKL,
        pixel_sets: Sequence[torch.Tensor],
        augmentation: Augmentation = Augmentation(),
    ):
        super().__init__(vae, augmentation)
        if augmentation.crop_each_step:
            raise ValueError("the latent cache holds one crop per photo")
        # Each set on its own: an image's encoding does not depend on the other set's count.
        self.parameters = torch.cat([encode_distribution(vae, pixels) for pixels in pixel_sets])
        self.mirrored = None
        if augmentation.flip:
            mirrors = [encode_distribution(vae, pixels.flip(-1)) for pixels in pixel_sets]
            self.mirrored = torch.cat(mirrors)

    def __len__(self) -> int:
        return len(self.parameters)

    def posterior(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        flips = self.augmentation.flips(len(indices), generator)
        if flips is None or self.mirrored is None:
            return self.parameters[indices]
        return torch.where(
            flips.view(-1, 1, 1, 1), self.mirrored[indices], self.parameters[indices]
        )


class EncodedEachStep(LatentSource):
    """Run the VAE encoder on every step: what caching saves, and what a fresh crop of each
    photo every step needs."""

    def __init__(
        self,
        vae: AutoencoderKL,
        pixel_sets: Sequence[torch.Tensor | list[torch.Tensor]],
        augmentation: Augmentation = Augmentation(),
    ):
        """`pixel_sets`: cropped images ([N, 3, H, W] per set), or with crop_each_step the
        uncropped images (a list per set: their sizes differ)."""
        super().__init__(vae, augmentation)
        self.images = [image for pixels in pixel_sets for image in pixels]
        # The usual case stays one tensor, indexed once per step.
        self.pixels = None if augmentation.crop_each_step else torch.cat(list(pixel_sets))

    def __len__(self) -> int:
        return len(self.images)

    def posterior(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        return encode_distribution(self.vae, self.pixels_of(indices, generator))

    def pixels_of(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """This step's pixels of the images `indices`: cropped anew (crop_each_step), then
        mirrored where drawn (flip)."""
        if self.pixels is not None:
            pixels = self.pixels[indices]
        else:
            pixels = torch.stack([self._random_crop(self.images[i], generator) for i in indices])
        flips = self.augmentation.flips(len(indices), generator)
        if flips is None:
            return pixels
        return torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)

    @staticmethod
    def _random_crop(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spare_x, spare_y = crop_spare(pixels)
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
        return square_crop(pixels, left, top)


def latent_source(
    vae: AutoencoderKL,
    pixel_sets: Sequence[torch.Tensor | list[torch.Tensor]],
    cache: bool,
    augmentation: Augmentation = Augmentation(),
) -> LatentSource:
    """One source over the images of every set, in order."""
    if cache:
        return CachedLatents(vae, pixel_sets, augmentation)  # type: ignore[arg-type]
    return EncodedEachStep(vae, pixel_sets, augmentation)


@dataclass(frozen=True)
class LatentRange:
    """The images [start, start + size) of `source`, numbered from 0: one subset's images."""

    source: LatentSource
    start: int
    size: int

    def __len__(self) -> int:
        return self.size

    def indices(self, indices: list[int]) -> list[int]:
        """The source's indices of this range's images `indices`."""
        return [self.start + index for index in indices]

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        return self.source.sample(self.indices(indices), generator)


# -- prompts ---------------------------------------------------------------------------------------


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the model's length, as the pipeline does at inference: [K, L]."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_prompts(
    text_encoder: CLIPTextModel, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states, and the pooled embedding when the model conditions on it (SDXL's
    encoders, models/sdxl.py; None for SD)."""
    output = text_encoder(input_ids.to(text_encoder.device))
    pooled = output[1].float() if getattr(text_encoder, "pooled_output", False) else None
    return output[0].float(), pooled


def encode_prompt(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    return encode_prompts(text_encoder, input_ids)[0]


@dataclass
class Prompts:
    """The data's distinct prompts (the instance prompt or each photo's captioned one, then the
    class prompt) as the trainable model consumes them: token ids, or hidden states.

    When the text encoder trains, the ids go through it inside the model on every step. A frozen
    encoder gives the same hidden states every time, so they are computed once, unless
    `cache=False` asks for an encoder pass per step (what caching saves; kept for the benchmark),
    one pass over the prompts a step uses.
    """

    ids: torch.Tensor  # [K, L] (SDXL: [K, 2, L], one row per tokenizer)
    frozen_text_encoder: CLIPTextModel | None
    cached: torch.Tensor | None = None  # [K, L, D]
    cached_pooled: torch.Tensor | None = None  # [K, P]: SDXL's pooled embedding

    @classmethod
    def of(
        cls,
        prompts: list[str],
        tokenizer: CLIPTokenizer,
        frozen_text_encoder: CLIPTextModel | None,
        cache: bool = True,
    ) -> Prompts:
        ids = tokenize(tokenizer, prompts)
        encoded = cls(ids, frozen_text_encoder)
        if frozen_text_encoder is not None and cache:
            encoded.cached, encoded.cached_pooled = encode_prompts(frozen_text_encoder, ids)
        return encoded

    @property
    def is_embedding(self) -> bool:
        return self.frozen_text_encoder is not None

    def value(self) -> torch.Tensor:
        """Every prompt: [K, L] ids or [K, L, D] hidden states."""
        if not self.is_embedding:
            return self.ids
        if self.cached is not None:
            return self.cached
        return encode_prompt(self.frozen_text_encoder, self.ids)

    def rows(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """One row per entry of `prompt_ids`: that prompt's ids or hidden states."""
        return self.encoded_rows(prompt_ids)[0]

    def encoded_rows(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`rows`, and the rows' pooled embeddings (SDXL with a frozen encoder; else None)."""
        rows = list(prompt_ids)
        if self.is_embedding and self.cached is None:  # encode only what this step uses
            used = sorted(set(rows))
            hidden, pooled = encode_prompts(self.frozen_text_encoder, self.ids[used])
            rows = [used.index(k) for k in rows]
        else:
            hidden, pooled = self.value(), self.cached_pooled
        # Each prompt once, in order (a step of one instance row): the tensors themselves, which
        # nothing downstream changes in place; else a copy of the rows.
        if len(rows) == len(hidden) and rows == list(range(len(hidden))):
            return hidden, pooled
        return hidden[rows], None if pooled is None else pooled[rows]


# -- batches ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch. `condition` and `added["pooled"]` may be the prompts' cache itself
    (Prompts.encoded_rows): read them, never change them in place."""

    latents: torch.Tensor  # instance rows first, then class rows
    condition: torch.Tensor  # ids or hidden states, same row order
    condition_is_embedding: bool
    instance_rows: int
    # The subject of each instance row (its class row is the same row of the class rows);
    # empty: every row is subject 0's.
    subject_of_row: list[int] = field(default_factory=list)
    subjects: int = 1
    # What else the model's forward takes, by keyword, same row order: SDXL's "time_ids" (and
    # "pooled" with a frozen text encoder); empty for SD.
    added: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Subset:
    """Images of one kind (instance or class): a range of the data's images, in a seeded order.
    Its prompt is the data's prompt at the subset's place (instance first)."""

    latents: LatentRange
    order: ShuffledOrder


@dataclass
class DreamBoothData:
    """Every image as latents (the subjects' photos, subject by subject, then the class images,
    class by class), the prompts, and one seeded order per subject and per class."""

    latents: LatentSource
    prompts: Prompts  # the distinct prompts of the images
    prompt_of: list[int]  # image i trains with prompt prompt_of[i]
    subjects: list[Subset]  # one per subject
    class_sets: list[Subset]  # one per class; empty without prior preservation
    class_of: list[int]  # subject s's class rows come from class_sets[class_of[s]]
    # SDXL: each image's micro-conditioning ([N, 6], models/sdxl.py), in the source's numbering:
    # the crop offsets travel with the cached latents. None for SD.
    time_ids: torch.Tensor | None = None

    @property
    def instance(self) -> Subset:
        """The first (or only) subject's images."""
        return self.subjects[0]

    @property
    def classes(self) -> Subset | None:
        """The first class's images; None without prior preservation."""
        return self.class_sets[0] if self.class_sets else None

    def condition(self, indices: list[int]) -> torch.Tensor:
        """The prompt rows of the images `indices` (the source's numbering)."""
        return self.prompts.rows([self.prompt_of[index] for index in indices])

    def added(self, indices: list[int], pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The model's added inputs (Batch.added) for the images `indices`, whose prompts'
        pooled embeddings are `pooled`."""
        added = {} if pooled is None else {"pooled": pooled}
        if self.time_ids is not None:
            added["time_ids"] = self.time_ids[indices]
        return added

    def batch(
        self, micro_step: int, per_rank: int, rank: int, world_size: int, generator: torch.Generator
    ) -> Batch:
        """The micro-batch of `rank` at global micro-step `micro_step` (a pure function of them).

        Rows go to the subjects in turn (row r of the run to subject r mod S), each subject
        drawing from its own order; each instance row gets a class row of its subject's class,
        drawn from that class's order. The rows of both kinds go through the encoders together
        (one VAE call, one text encoder call when they run every step); their latent noise is
        drawn kind by kind."""
        start = (micro_step * world_size + rank) * per_rank
        rows = range(start, start + per_rank)
        count = len(self.subjects)
        subject_of_row = [row % count for row in rows]
        indices = [self._draw(self.subjects[row % count], row // count) for row in rows]
        parts = [per_rank]
        if self.class_sets:
            indices += [
                self._draw(self.class_sets[self.class_of[row % count]], self._class_position(row))
                for row in rows
            ]
            parts.append(per_rank)
        condition, pooled = self.prompts.encoded_rows([self.prompt_of[i] for i in indices])
        return Batch(
            latents=self.latents.sample(indices, generator, parts=parts),
            condition=condition,
            condition_is_embedding=self.prompts.is_embedding,
            instance_rows=per_rank,
            subject_of_row=subject_of_row,
            subjects=count,
            added=self.added(indices, pooled),
        )

    @staticmethod
    def _draw(subset: Subset, position: int) -> int:
        """The source index of the image at `position` of the subset's order."""
        return subset.latents.indices(subset.order.take(position, 1))[0]

    def _class_position(self, row: int) -> int:
        """Where `row` draws in its subject's class's order: the subjects of one class share
        it, taking turns, so that none of them repeats another's class image."""
        subject = row % len(self.subjects)
        members = [s for s, c in enumerate(self.class_of) if c == self.class_of[subject]]
        return (row // len(self.subjects)) * len(members) + members.index(subject)


@dataclass(frozen=True)
class ImageSet:
    """Where one kind of training image comes from, and how to say what is wrong with it."""

    directory: Path
    prompt: str
    purpose: str  # names its crop and order seeds
    empty: str  # the field to blame when there are no images
    field: str  # the field to blame for a bad image
    advice: str
    captions: str = "ignore"  # instance.captions: what a photo's own caption does
    paths: tuple[Path, ...] = ()  # these images of `directory`; empty: all of them

    def image_paths(self) -> list[Path]:
        return list(self.paths) if self.paths else list_images(self.directory)


def prompts_of(image_set: ImageSet) -> list[str]:
    """Each image's prompt, in `image_paths` order (the order of `load_set`'s pixels)."""
    paths = image_set.image_paths()
    if image_set.captions == "ignore":
        return [image_set.prompt] * len(paths)
    captions = read_captions(image_set.directory, paths, image_set.field)
    return [prompt_for(image_set.prompt, captions.get(p.name), image_set.captions) for p in paths]


def load_set(
    image_set: ImageSet,
    training: TrainingSpec,
    geometry: list[PhotoGeometry] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """The set's cropped images, or with cropEachStep its resized, uncropped ones. `geometry`
    receives each cropped photo's (see to_training_tensor)."""
    paths = image_set.image_paths()
    if not paths:
        raise no_images(image_set.empty, image_set.directory)
    if training.crop_each_step:
        resolution = training.resolution
        return [
            resized_tensor(load_rgb(path, image_set.field, image_set.advice), resolution)
            for path in paths
        ]
    return load_training_images(
        paths,
        training.resolution,
        training.center_crop,
        seed=derive_seed(training.seed, "crop", image_set.purpose),
        field=image_set.field,
        advice=image_set.advice,
        geometry=geometry,
    )


def build_data(
    config: TrainerConfig,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    frozen_text_encoder: CLIPTextModel | None,
    instance_dirs: Sequence[Path],
    class_dirs: Sequence[Path | None],
    micro_conditioning: bool = False,
) -> DreamBoothData:
    """Each subject's photos and each class's images as latents, prompts as conditioning,
    seeded orders. `instance_dirs` holds each subject's photos (subjects_of order),
    `class_dirs` each class's generated images (None where none are generated).

    `frozen_text_encoder` is None when the text encoder trains (prompts stay token ids).
    `micro_conditioning` (SDXL): each image's time_ids from its size and crop.
    """
    training = config.training
    subjects, classes = subjects_of(config), classes_of(config)
    # One group of sets per subset: each subject's photos, then each class's images.
    groups = [
        [subject_image_set(subject, directory)]
        for subject, directory in zip(subjects, instance_dirs, strict=True)
    ]
    groups += [
        class_image_sets(config, class_set, directory)
        for class_set, directory in zip(classes, class_dirs, strict=True)
    ]
    geometry: list[PhotoGeometry] | None = None
    if micro_conditioning:
        if training.crop_each_step:
            raise ConfigError(
                "training.cropEachStep",
                "not for SDXL: its UNet is told each photo's crop, and the crop would change "
                "every step; use centerCrop or one random crop per photo",
            )
        geometry = []
    pixel_sets = [
        _joined([load_set(image_set, training, geometry) for image_set in g]) for g in groups
    ]
    latents = latent_source(
        vae, pixel_sets, cache=training.cache_latents, augmentation=Augmentation.of(training)
    )
    subsets, start = [], 0
    for group, pixels in zip(groups, pixel_sets, strict=True):
        order = ShuffledOrder(len(pixels), derive_seed(training.seed, "order", group[0].purpose))
        subsets.append(Subset(LatentRange(latents, start, len(pixels)), order))
        start += len(pixels)
    image_prompts = [prompt for group in groups for s in group for prompt in prompts_of(s)]
    distinct = list(dict.fromkeys(image_prompts))  # the text cache holds each once
    prompts = Prompts.of(
        distinct, tokenizer, frozen_text_encoder, cache=training.cache_text_embeddings
    )
    prompt_of = [distinct.index(prompt) for prompt in image_prompts]
    time_ids = None
    if geometry is not None:
        from .models.sdxl import time_ids_of

        time_ids = time_ids_of(geometry, training.resolution)
    return DreamBoothData(
        latents,
        prompts,
        prompt_of,
        subsets[: len(subjects)],
        subsets[len(subjects) :],
        [subject.class_index or 0 for subject in subjects],
        time_ids,
    )


def _purpose(kind: str, index: int) -> str:
    """Names the crop and order seeds of a subset: the first subject and class keep the names
    a one-subject job always used (its runs reproduce)."""
    return kind if index == 0 else f"{kind}-{index}"


def subject_image_set(subject: Subject, directory: Path) -> ImageSet:
    return ImageSet(
        directory,
        subject.spec.prompt,
        _purpose("instance", subject.index),
        subject.images_field,
        subject.images_field,
        "replace or remove it",
        captions=subject.spec.captions,
    )


def class_image_sets(
    config: TrainerConfig, class_set: ClassSet, class_dir: Path | None
) -> list[ImageSet]:
    """A class's images: the user's (classImagesUri), then the generated shortfall."""
    plan = class_image_plan(config, class_set)
    priors = class_set.priors
    purpose = _purpose("class", class_set.index)
    sets = []
    if plan.supplied:
        own = fetch_dir(priors.class_images_uri, config.s3, config.model_cache_dir())
        sets.append(
            ImageSet(
                own,
                class_set.prompt,
                purpose,
                class_set.images_field,
                class_set.images_field,
                "replace or remove it",
                paths=tuple(own / name for name in plan.supplied),
            )
        )
    if plan.generated:
        if class_dir is None:
            raise ConfigError("priorPreservation.enabled", "true, but there are no class images")
        generated = tuple(class_dir / image_name(i) for i in range(plan.generated))
        sets.append(
            ImageSet(
                class_dir,
                class_set.prompt,
                purpose,
                "priorPreservation (class images: run the priors phase first)",
                "storage.priorCacheUri",
                f"the class-image set is corrupt: delete {class_set.uri} and run the job "
                "again to generate it anew",
                paths=generated,
            )
        )
    return sets


def _joined(pixel_sets: list[torch.Tensor | list[torch.Tensor]]) -> torch.Tensor | list:
    """One subset's pixels from its sets: a tensor, or (cropEachStep) a list of images."""
    if len(pixel_sets) == 1:
        return pixel_sets[0]
    if all(isinstance(pixels, torch.Tensor) for pixels in pixel_sets):
        return torch.cat(pixel_sets)
    return [image for pixels in pixel_sets for image in pixels]
