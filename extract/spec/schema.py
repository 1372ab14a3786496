"""The spec's YAML as pydantic models: types, defaults, choices and ranges; the JSON Schema.

Only what can be checked from the document alone lives here (no torch, no file I/O): whether a block
exists, a timestep fits the schedule or a pool fits a map depends on the model and is checked in
`extract.spec.resolve`. Unknown keys are refused everywhere. The bounded field types and the message
helpers are in `extract.spec.fields`; `extract.spec.schema_errors` turns pydantic's errors into the
project's messages.

YAML schema (defaults in brackets; `null` where a default is derived)::

    name: cpu_small                      # [file stem] a label; not part of the fingerprint
    model:
      family: adm | diffusers            # [adm] diffusers: `path` only (+ class_label), schedule from its scheduler
      path: models/ddpm-cifar10-32       # diffusers: a local UNet or pipeline directory (no hub ids)
      class_label: 3                     # [null] diffusers: the class a class-conditional UNet is given, or dataset
      preset: 256x256_diffusion_uncond   # [null] a released preset, or "embedded:<name>"
      flags: {num_channels: 32, ...}     # [{}] guided-diffusion flag overrides on top of the preset
      checkpoint: path | "embedded:<name>" | null   # [null] null = random weights from init_seed
      init_seed: 0                       # [0]
      noise_schedule: linear | cosine    # [preset's, else linear]
      diffusion_steps: 1000              # [preset's, else 1000]
    dataset:
      kind: folder | csv | hdf5 | idx | digits
      path: data/imagenet                # required for folder/csv/hdf5; idx: [Fashion-MNIST's folder, extract.idx];
                                         #   digits: must be null (sklearn's bundled 8x8 digits)
      splits: [train, test]              # [null] = every split the source has
      limit: 1000 | {train: 1000, test: 200}   # [null] keep the first n rows of each split, in source order
      image_size: 256                    # [model image_size] must be divisible by the U-Net's total downsampling
      preprocess: reference              # [reference] guided-diffusion's center_crop_arr (extract/preprocess.py)
    features:
      timesteps: [90, 150]               # 0-based indices of the diffusion_steps-step process
      blocks: [19, 24, "output_blocks.8"]   # paper numbering (1-based) or module names
      pooling: [2] | {default: [2], 24: [2, 4]}   # [{default: [2]}] average-pool sizes p (output p x p); [] = none
      tokens: 16 | {default: 16, 19: 8} | null    # [null] token mode: average-pool to at most s x s
    noise: {seed: 0, draws: 1, combine: mean}   # K = draws noise draws, K U-Net forwards per image and timestep;
                                         # combine mean: one array, the draws' features averaged;
                                         # separate: one array per draw (draw d >= 1 named <feature>_d<d>)
                                         # rule: generator (default) | counter (drawn on the compute device)
    views: {center: true, hflip: false}  # hflip adds a horizontally flipped second view ("_flip" features)
    storage: {dtype: float16, compressor: blosc-lz4, chunk_rows: 64, shard_rows: null}
                                         # dtype float16|float32; compressor blosc-lz4|zstd|none;
                                         # shard_rows null = chosen by the store; else a multiple of chunk_rows
    compute: {dtype: float32, batch_size: 32, device: auto, num_workers: 0}
                                         # dtype float32|bfloat16|float16; device auto|cpu|cuda[:N]|mps
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from extract.spec.fields import (
    MAX_BLOCKS,
    MAX_FLAGS,
    MAX_SMALL_LIST,
    MAX_TEXT,
    MAX_TIMESTEPS,
    BlockRefList,
    IntList,
    Key,
    KeyList,
    LimitField,
    NonNegInt,
    Path_,
    PoolingField,
    PosInt,
    TokensField,
    device_problem,
    name_problem,
    short_repr,
)
from extract.storage import COMPRESSIONS, STORAGE_DTYPES

SPEC_VERSION = 1
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# How the U-Net runs; each changes the last bits (kernels differ), so a non-default one is part of the
# fingerprint. deterministic: false lets cuDNN autotune, and then the bytes may change run to run.
COMPUTE_OPTION_DEFAULTS = {"channels_last": False, "compile": False, "deterministic": True}
NOISE_RULES = ("generator", "counter")  # implemented by extract.diffusion.noise_for
DEFAULT_NOISE_RULE = NOISE_RULES[0]
DATASET_KINDS = ("folder", "csv", "hdf5", "idx", "digits")
PREPROCESSING = ("reference",)
# How a store keeps K noise draws: averaged into one array, or one array per draw (augmentation for probes).
NOISE_COMBINE = ("mean", "separate")
SCHEDULES = ("linear", "cosine")
MODEL_FAMILIES = ("adm", "diffusers")  # guided-diffusion U-Nets; diffusers UNet2DModel directories
DEFAULT_POOLING = (2,)
SECTIONS = ("model", "dataset", "features", "noise", "views", "storage", "compute")
REQUIRED_SECTIONS = ("model", "dataset", "features")
TOP_KEYS = ("version", "name", *SECTIONS)


class _Section(BaseModel):
    # strict: YAML's "64" is a string, not a number; 1.5 is no seed; true is no timestep.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Section):
    """The diffusion U-Net: which network, which weights, which noise schedule."""

    family: Literal[MODEL_FAMILIES] = Field(  # type: ignore[valid-type]
        "adm",
        title="model family",
        description="adm: a guided-diffusion U-Net (preset, flags, checkpoint); diffusers: a UNet2DModel "
        "directory given by `path`, its schedule read from the directory's scheduler",
    )
    path: Path_ = Field(
        None,
        description="diffusers: a local save_pretrained directory (UNet or pipeline); no hub ids",
        examples=["models/ddpm-cifar10-32"],
    )
    class_label: NonNegInt | Literal["dataset"] | None = Field(
        None,
        description="diffusers: the class fed to a class-conditional UNet: a fixed class for every row, or "
        "'dataset' for each row's own label (which then enters its features: probes of such a store see the label)",
        examples=[3, "dataset"],
    )
    preset: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT,
        description="a released guided-diffusion configuration, or 'embedded:<name>' for a model shipped with diffbank",
        examples=["256x256_diffusion_uncond", "embedded:fmnist32"],
    )
    flags: dict[Key, Any] | None = Field(
        None,
        max_length=MAX_FLAGS,
        description="guided-diffusion flags over the preset's",
        examples=[{"num_channels": 32, "num_res_blocks": 1}],
    )
    checkpoint: Path_ = Field(
        None,
        description="a weights file, 'embedded:<name>', or null for random weights from init_seed",
        examples=["models/256x256_diffusion_uncond.pt"],
    )
    init_seed: NonNegInt = Field(0, description="seed of the random weights when checkpoint is null")
    noise_schedule: Literal[SCHEDULES] | None = Field(  # type: ignore[valid-type]
        None, title="noise schedule", description="beta schedule; null: the preset's, else linear"
    )
    diffusion_steps: PosInt | None = Field(
        None, description="steps of the diffusion process; null: the preset's, else 1000", examples=[1000]
    )


class DatasetSection(_Section):
    """The images: where they are, which splits, how many, at which size."""

    kind: Literal[DATASET_KINDS] = Field(  # type: ignore[valid-type]
        title="dataset kind",
        description="folder: an ImageFolder tree (split/class/image); csv: rows of path, label, split; hdf5: "
        "image arrays; idx: Fashion-MNIST/MNIST IDX files; digits: scikit-learn's bundled 8x8 digits",
        examples=["folder"],
    )
    path: Path_ = Field(
        None,
        description="required for folder, csv and hdf5; idx: the folder of the IDX files (default: Debian's "
        "Fashion-MNIST); digits: must be null",
        examples=["data/imagenet"],
    )
    splits: KeyList = Field(
        None,
        min_length=1,
        max_length=MAX_SMALL_LIST,
        description="splits to extract; null: every split the source has",
        examples=[["train", "test"]],
    )
    limit: LimitField = Field(
        None,
        description="keep the first n rows of each split (or per split), in source order; null: all",
        examples=[1000, {"train": 1000, "test": 200}],
    )
    image_size: PosInt | None = Field(
        None,
        description="side of the square input; null: the model's; must be divisible by the U-Net's total downsampling",
        examples=[256],
    )
    preprocess: Literal[PREPROCESSING] = Field(  # type: ignore[valid-type]
        "reference",
        title="preprocessing",
        description="reference: guided-diffusion's center_crop_arr (resize, centre crop, scale to [-1, 1])",
    )


class FeaturesSection(_Section):
    """Which activations are stored: timesteps x blocks, each pooled."""

    timesteps: IntList = Field(
        min_length=1,
        max_length=MAX_TIMESTEPS,
        description="0-based indices t of the diffusion_steps-step process at which x_t is fed to the U-Net",
        examples=[[90, 150], 90],
    )
    blocks: BlockRefList = Field(
        min_length=1,
        max_length=MAX_BLOCKS,
        description="U-Net blocks to read: the paper's 1-based numbering or module names "
        "(`diffbank model blocks` lists them)",
        examples=[[19, 24, "output_blocks.8"]],
    )
    pooling: PoolingField = Field(
        None,
        description="average-pool sizes p (each stores a p x p map), for all blocks or per block under "
        "'default' and block keys; [] = none; null: {default: [2]}",
        examples=[[2], {"default": [2], "24": [2, 4]}],
    )
    tokens: TokensField = Field(
        None,
        description="token mode: also store the map average-pooled to at most s x s (for attention heads), "
        "for all blocks or per block; null or 0: none",
        examples=[16, {"default": 16, "19": 8}],
    )


class NoiseSection(_Section):
    """The noise that makes x_t from an image: seeded, so a store can be extracted again to the bit."""

    seed: NonNegInt = Field(0, description="seed of the noise; each sample's noise depends on (seed, sample, t)")
    draws: PosInt = Field(1, description="K noise draws: K U-Net forwards per image and timestep", examples=[1, 4])
    combine: Literal[NOISE_COMBINE] = Field(  # type: ignore[valid-type]
        "mean",
        title="noise combine",
        description="mean: one array, the draws' features averaged; separate: one array per draw (draw d >= 1 "
        "named <feature>_d<d>), which probes use as augmentation",
    )
    rule: Literal[NOISE_RULES] = Field(  # type: ignore[valid-type]
        DEFAULT_NOISE_RULE,
        description="generator: a seeded torch CPU generator per sample (the default); counter: a "
        "counter-based hash drawn on the compute device (fast on GPUs; bytes differ from generator's)",
    )


class ViewsSection(_Section):
    """Which views of each image pass through the U-Net."""

    center: bool = Field(True, description="the image as preprocessed")
    hflip: bool = Field(False, description="also its horizontal mirror, stored as '<feature>_flip' features")

    @model_validator(mode="after")
    def _one_view(self) -> ViewsSection:
        if not (self.center or self.hflip):
            raise PydanticCustomError("no_view", "at least one of center and hflip must be true")
        return self


class StorageSection(_Section):
    """How the Zarr store keeps the features on disk."""

    dtype: Literal[STORAGE_DTYPES] = Field(  # type: ignore[valid-type]
        "float16", title="storage dtype", description="dtype of the stored features (bfloat16 only as compute.dtype)"
    )
    compressor: Literal[COMPRESSIONS] = Field(  # type: ignore[valid-type]
        "blosc-lz4", title="compressor", description="blosc-lz4: fast; zstd: smaller; none: raw bytes"
    )
    chunk_rows: PosInt = Field(64, description="samples per chunk, the unit a reader decompresses", examples=[64])
    shard_rows: PosInt | None = Field(
        None,
        description="samples per shard (one object, one unit of resumable work); a multiple of chunk_rows; "
        "null: chosen by the store",
        examples=[1024],
    )

    @field_validator("shard_rows")
    @classmethod
    def _whole_chunks(cls, value: int | None, info: Any) -> int | None:
        chunk_rows = info.data.get("chunk_rows")
        if value is not None and chunk_rows and value % chunk_rows:
            raise PydanticCustomError(
                "shard_rows", "{value} is not a multiple of chunk_rows={chunk}", {"value": value, "chunk": chunk_rows}
            )
        return value


class ComputeSection(_Section):
    """How the U-Net runs: precision, batch, device; non-default kernels are part of the fingerprint."""

    dtype: Literal[COMPUTE_DTYPES] = Field(  # type: ignore[valid-type]
        "float32", title="compute dtype", description="precision of the U-Net's forward pass"
    )
    batch_size: PosInt = Field(32, description="images loaded per batch (does not change the stored bytes)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:<index> or mps", examples=["cuda:0"])
    num_workers: NonNegInt = Field(0, description="image-loading processes; 0: two threads in the extracting process")
    channels_last: bool = Field(COMPUTE_OPTION_DEFAULTS["channels_last"], description="NHWC layout for the U-Net")
    compile: bool = Field(COMPUTE_OPTION_DEFAULTS["compile"], description="torch.compile the U-Net's feature pass")
    deterministic: bool = Field(
        COMPUTE_OPTION_DEFAULTS["deterministic"], description="false: cuDNN autotuning (bytes may vary run to run)"
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        problem = device_problem(value)
        if problem:
            raise PydanticCustomError("device", "{problem}", {"problem": problem})
        return value


class SpecDocument(_Section):
    """A whole spec file."""

    version: int = Field(SPEC_VERSION, description="version of the spec format")
    name: str | None = Field(
        None,
        min_length=1,
        description="a label and plain file name (stores/<name>.zarr); not part of the fingerprint; null: "
        "the file's stem",
        examples=["cpu_small"],
    )
    model: ModelSection = Field(description="the diffusion U-Net")
    dataset: DatasetSection = Field(description="the images")
    features: FeaturesSection = Field(description="timesteps x blocks x pooling")
    noise: NoiseSection = Field(NoiseSection(), description="the noise that makes x_t")
    views: ViewsSection = Field(ViewsSection(), description="which views of each image")
    storage: StorageSection = Field(StorageSection(), description="how the store keeps the features")
    compute: ComputeSection = Field(ComputeSection(), description="how the U-Net runs")

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        # `noise:` with nothing under it is YAML's null: an empty section, every default applies.
        if isinstance(raw, dict):
            return {k: ({} if k in SECTION_MODELS and v is None else v) for k, v in raw.items()}
        return raw

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        problem = name_problem(value) if value is not None else ""
        if problem:
            raise PydanticCustomError("name", "{problem}", {"problem": problem})
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if value != SPEC_VERSION:
            raise PydanticCustomError(
                "version",
                "unsupported spec version {value}; this diffbank reads version {supported}",
                {"value": short_repr(value), "supported": SPEC_VERSION},
            )
        return value


SECTION_MODELS: dict[str, type[_Section]] = {
    "model": ModelSection,
    "dataset": DatasetSection,
    "features": FeaturesSection,
    "noise": NoiseSection,
    "views": ViewsSection,
    "storage": StorageSection,
    "compute": ComputeSection,
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file (for editors and `diffbank spec schema`)."""
    return SpecDocument.model_json_schema()
