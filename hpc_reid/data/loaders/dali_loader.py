"""The NVIDIA DALI backend: decode and augment ReID batches with DALI, on the GPU when there is one.

The pipeline is fed by ``fn.external_source`` in batch mode. Its callback (:class:`RankBatches`)
maps DALI's (epoch index, iteration) to one batch of the batch sampler's index stream for this
rank (either sampler of :mod:`hpc_reid.data.samplers`, which replans any epoch on request:
``rank_batches``), and returns the encoded JPEG bytes of the batch, its pids, camids and dataset
indices, and every sample's random decisions. The decisions are drawn on the CPU by
:meth:`~hpc_reid.data.transforms.TrainTransform.sample_params` from ``sample_rng(seed, epoch,
position)``, exactly as the torch loader draws them, and fed to the DALI operators as per-sample
arguments. So both backends flip, crop and erase the same samples the
same way, and pixels differ only by the JPEG decoder's and the resizer's rounding
(:mod:`hpc_reid.data.transforms` gives the semantics; DALI's own random generators are not used).

Decoding (:func:`decoder_args`). On the CPU DALI decodes with libjpeg-turbo, as PIL: the pixels
are PIL's, bit for bit. On the GPU nvJPEG decodes with fancy upsampling, libjpeg's interpolation
of the halved chroma of 4:2:0 JPEGs (Market, MSMT17, the synthetic set) rather than nvJPEG's
default repetition, so that mainly the IDCT's rounding differs from PIL (the GPU tests
measure it); a share ``loader.dali_hw_decoder_load`` of each batch (DALI's default 0.65) goes to
the hardware JPEG decoder of A100, H100 and later GPUs, with its own rounding (0 sends none:
every image decoded the same way, as pixel comparisons need). The resize differs from PIL's on
the image's outermost rows and columns, where DALI repeats the edge pixel and PIL renormalises
its clipped filter.

Graph: decode (``mixed``, nvJPEG, with CUDA; ``cpu`` with ``device_id=None`` without) ->
bilinear resize with antialiasing, to float, of only the part of the image that the pad-and-crop
window keeps (a per-sample ROI on the same pixel grid as resizing the whole image) ->
``crop_mirror_normalize`` pads that part to the window with black (pixel 0, BoT's padding, written
as its normalised value), mirrors flipped samples and normalises to float CHW, one pass. Random
erasing fills each sample's rectangle with 0 (the mean pixel) in place on the output batch
(:func:`erase_`), on the same device: DALI's erase operator copies every image, which on the CPU
cost as much as the resize. On 2 CPU cores this graph is about 1.5x the one that resized the
whole image, then sliced, mirrored-normalised and erased in four operators. With colour jitter
on, whose contrast step blends with the whole image's mean grey, the graph resizes the whole
image, jitters it with DALI's arithmetic operators (:func:`_color_jitter`), and pads-and-crops it
with a slice before ``crop_mirror_normalize``.

Tracklets (video sets; :mod:`.tracklets`). A training batch of B tracklets is one external-source
batch of B x T frames: the callback draws each tracklet's frames and decisions with
:func:`~.tracklets.tracklet_sample` (as the torch loader does) and returns the chosen frames'
JPEGs, each with its tracklet's decisions (or its own, ``augment_per: frame``) and labels, so all
frames of a batch are decoded in one call and augmented by the image graph unchanged; the output
(B T, C, H, W) is then seen as (B, T, C, H, W) and the labels taken once per tracklet. With
channels_last the pipeline writes (B T, H, W, C): channels_last frames, no copy. The test loader
decodes the dense clips' frames as images (:class:`~.tracklets.ClipBatches`).

Pipelines. On the CPU the loader runs one single-threaded pipeline per core side by side and
takes batches from them in turn (batch b from pipeline ``b % n``; :func:`pipeline_layout`): on
2 cores that is about 1.2x one pipeline with two threads, whose operators split each batch in
small tasks across the threads. On the GPU it runs one. The cores are this rank's share of the
node (:func:`~hpc_reid.launch.distributed.rank_cores`): the node's divided by the ranks on it
(torchrun's ``LOCAL_WORLD_SIZE``, SLURM's tasks per node), unless the process's affinity mask is
already smaller than the machine (SLURM's ``--cpus-per-task`` binding), which is then its share.
Outputs are taken over by torch through DLPack, not copied.

Epochs and resume. :class:`DaliTrainLoader` has ``len(loader) == len(sampler)`` and reads the
sampler's epoch and start batch whenever a loop starts, like the torch loader. The pipelines'
source is endless: it runs from that batch through the following epochs, so the pipelines keep
prefetching across an epoch's end. A loop that continues exactly there (the trainer's
``set_epoch(e + 1)`` after a full epoch) takes the next batches from the same pipelines; anything
else (a loop left early, ``load_state_dict``, ``set_epoch`` to another epoch) builds new ones.
The test loader's source stops after the last record. With ``loader.num_workers > 0`` the
callback runs in DALI Python worker processes (``parallel=True``, the workers shared out among
the pipelines), which receive a copy of the sampler: the plan is a pure function of (seed,
epoch), so workers need no messages. ``loader.prefetch`` is each pipeline's prefetch queue depth.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray

from hpc_reid.config import LoaderConfig, VideoConfig
from hpc_reid.data.datasets.base import ImageRecord, Record
from hpc_reid.data.packed import read_image_bytes
from hpc_reid.data.samplers import PlannedBatchSampler
from hpc_reid.data.transforms import LUMA, TrainTransform, sample_rng
from hpc_reid.launch.distributed import rank_cores

from .torch_loader import CorruptImageError, load_rgb
from .tracklets import ClipBatches, clip_frames, clips_per_batch, require_video, tracklet_sample

_OUTPUTS = ("images", "pids", "camids", "indices")
#: The external source's outputs: the batch's JPEGs, pids, camids and indices, then for training
#: each sample's erase box, flip, and either visible size, ROI start and end, and crop position,
#: or, with colour jitter, the crop window and the jitter factors.
_NUM_SOURCE_TEST, _NUM_SOURCE_TRAIN, _NUM_SOURCE_JITTER = 4, 10, 8
#: What the loader reads from its batch sampler: DALI's workers replan each epoch themselves
#: (``rank_batches``) and number samples by their global positions, as the torch loader does.
_SAMPLER_READS = ("rank_batches", "batches_per_epoch", "batch_size", "epoch", "rank")
_SAMPLER_READS += ("world_size", "num_records")


def _read_bytes(path: str) -> np.ndarray:
    """Encoded bytes of an image file or of a pack row (``FILE.h5::INDEX/...``, checksummed)."""
    try:
        return np.frombuffer(read_image_bytes(path), dtype=np.uint8)
    except FileNotFoundError:
        raise CorruptImageError(f"image file {path} not found") from None
    except OSError as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from e


class RankBatches:
    """External-source callback: DALI iteration -> one batch of this rank.

    Training (``sampler`` given): an endless stream that starts at batch ``first`` of sampler
    epoch ``epoch`` and runs on through the following epochs (``sampler.batches_per_epoch``
    batches each), so the pipelines prefetch across an epoch's end instead of draining and
    refilling there. Test (``sampler`` None): ``records`` in order, ``batch_size`` each, then
    ``StopIteration``. With ``shards`` pipelines side by side, pipeline ``shard`` gets stream
    batches ``shard``, ``shard + shards``, ... (its iteration i is stream batch ``i * shards +
    shard``). Picklable: DALI's parallel workers receive a copy.

    Training tracklets (``video`` given): each sample of a batch is T frames (the module
    docstring), every output then holds B T entries, frame after frame.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        sampler: PlannedBatchSampler | None,
        transform: TrainTransform | None,
        *,
        epoch: int = 0,
        first: int = 0,
        seed: int = 0,
        batch_size: int = 1,
        shard: int = 0,
        shards: int = 1,
        video: VideoConfig | None = None,
    ) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard must be in [0, {shards}), got {shard}")
        if sampler is not None and not 0 <= first < sampler.batches_per_epoch:
            raise ValueError(
                f"first batch {first} is outside the epoch's {sampler.batches_per_epoch} batches"
            )
        self.shard, self.shards = int(shard), int(shards)
        self.video = video
        # An image's path, or a tracklet's frames' paths.
        self.paths = [tuple(map(str, r.frames)) if video else str(r.path) for r in records]
        self.pids = np.array([r.pid for r in records], dtype=np.int64)
        self.camids = np.array([r.camid for r in records], dtype=np.int64)
        self.sampler = copy.deepcopy(sampler)
        self.transform, self.epoch, self.first = transform, int(epoch), int(first)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self._plans: dict[int, list[list[int]]] = {}  # the last epochs' batches, by epoch

    def locate(self, b: int) -> tuple[int, int, list[list[int]]]:
        """(sampler epoch, batch index in it, the epoch's batches) of stream batch ``b``."""
        s = self.sampler
        if s is None:
            if not self._plans:
                n, size = len(self.paths), self.batch_size
                self._plans[0] = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
            return 0, b, self._plans[0]
        n = s.batches_per_epoch
        if b < n - self.first:
            epoch, index = self.epoch, self.first + b
        else:
            epoch, index = divmod(b - (n - self.first), n)
            epoch += self.epoch + 1
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e > epoch - 2}
            self._plans[epoch] = s.rank_batches(epoch)  # the whole epoch, from batch 0
        return epoch, index, self._plans[epoch]

    def image_paths(self, epoch: int, index: int, batch: np.ndarray) -> tuple[list[str], list]:
        """The files that batch ``index`` of sampler ``epoch`` (dataset indices ``batch``) decodes,
        in order, and for training each file's :class:`~hpc_reid.data.transforms.TrainParams`
        (from the samples' generators, as :class:`TaggedBatchSampler` numbers them)."""
        if self.transform is None:
            return [self.paths[i] for i in batch], []
        s, t = self.sampler, self.transform
        base = (index * s.world_size + s.rank) * s.batch_size  # positions in the global plan
        paths, params = [], []
        for j, i in enumerate(batch.tolist()):
            rng = sample_rng(self.seed, epoch, base + j)
            if self.video is None:
                paths.append(self.paths[i])
                params.append(t.sample_params(rng))
            else:
                frames, decisions = tracklet_sample(len(self.paths[i]), self.video, t, rng)
                paths += [self.paths[i][f] for f in frames.tolist()]
                params += decisions
        return paths, params

    def __call__(self, info: Any) -> tuple[Any, ...]:
        epoch, index, batches = self.locate(info.iteration * self.shards + self.shard)
        if index >= len(batches):
            raise StopIteration
        batch = np.asarray(batches[index], dtype=np.int64)
        paths, params = self.image_paths(epoch, index, batch)
        rows = np.repeat(batch, len(paths) // len(batch))  # each image's sample (T per tracklet)
        out = ([_read_bytes(p) for p in paths], self.pids[rows], self.camids[rows], rows)
        if self.transform is None:
            return out
        n = len(paths)
        erase = np.zeros((n, 4), dtype=np.int32)  # (top, left, height, width); 0 x 0: none
        t = self.transform
        height, width, pad = t.height, t.width, t.augment.pad
        flip = np.zeros(n, dtype=np.int32)
        window = np.zeros((n, 2), dtype=np.int32)  # (top, left) of the crop window on the image
        jitter = np.ones((n, 3), dtype=np.float32)  # brightness, contrast, saturation factors
        for j, p in enumerate(params):
            flip[j] = p.flip
            if p.jitter is not None:
                jitter[j] = p.jitter
            # The pipeline pads, crops and then mirrors (crop_mirror_normalize): the flipped
            # image's window at column c is the mirror of the original's window at column -c.
            left = p.crop_left - pad
            window[j] = (p.crop_top - pad, -left if p.flip else left)
            if p.erase is not None:
                erase[j] = p.erase
        if t.augment.color_jitter:
            return (*out, erase, flip, window, jitter)
        return (*out, erase, flip, *window_roi(window, height, width))


def erase_(images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Random erasing in place on a normalised (N, C, H, W) batch: sample j's rectangle
    ``boxes[j] = (top, left, height, width)`` becomes 0, the mean pixel; a 0 x 0 box erases
    nothing. DALI's erase operator copies every image, a pass over the batch that costs more on
    the CPU than the rest of the graph after decoding; these are a few small fills. On the CPU
    they go through numpy: torch's intra-op threads would wait for cores DALI's threads hold."""
    target = images.numpy() if images.device.type == "cpu" else images
    for j in np.flatnonzero(boxes[:, 2] * boxes[:, 3]):
        top, left, h, w = boxes[j].tolist()
        target[j, :, top : top + h, left : left + w] = 0.0
    return images


def _decode_error(error: RuntimeError, source: RankBatches, b: int) -> CorruptImageError | None:
    """The error naming the image for DALI's decoding ``error`` at stream batch ``b`` (DALI's
    message names only the operator and, sometimes, the sample's place in the batch): the
    batch's images are decoded again with PIL, and the first that fails is reported as the torch
    loader reports it. None for any other error."""
    if "decoders.image" not in str(error):
        return None
    epoch, index, batches = source.locate(b)
    paths, _ = source.image_paths(epoch, index, np.asarray(batches[index], dtype=np.int64))
    for path in paths:
        try:
            load_rgb(path)
        except CorruptImageError as e:
            return e
    return CorruptImageError(
        f"DALI could not decode an image of the batch {paths} (PIL decodes them all): "
        f"{str(error).strip().splitlines()[-3:]}"
    )


def _dali_device(device: torch.device | str | None) -> tuple[bool, int | None]:
    """(use the GPU, device id) for the training device; None means CUDA if available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return False, None
    return True, device.index if device.index is not None else torch.cuda.current_device()


def pipeline_layout(cfg: LoaderConfig, gpu: bool) -> tuple[int, int, int]:
    """(pipelines, threads each, Python workers each) for ``cfg`` on this process's cores
    (:func:`~hpc_reid.launch.distributed.rank_cores`: its share of the node).

    On the CPU, one single-threaded pipeline per core, dealt batches in turn, outruns one
    pipeline with a thread per core (2 cores: about 4,300 against 3,700 img/s for the whole
    loader). On the GPU one pipeline. ``loader.dali_pipelines`` sets the count; the cores and
    ``loader.num_workers`` are shared out among the pipelines (at least one thread each, and a
    parallel source needs a worker).
    """
    cores = rank_cores()
    n = cfg.dali_pipelines or (1 if gpu else cores)
    return n, max(1, cores // n), -(-cfg.num_workers // n)


def decoder_args(cfg: LoaderConfig, gpu: bool) -> dict[str, Any]:
    """``fn.decoders.image`` arguments: on the GPU (``mixed``: nvJPEG) fancy chroma
    upsampling, libjpeg's (and so PIL's) interpolating upsampling of 4:2:0 JPEGs instead of
    nvJPEG's default replication, and the hardware decoder's share
    (``loader.dali_hw_decoder_load``). The CPU decoder (libjpeg-turbo) always upsamples that
    way: the flag is passed for clarity and changes nothing there (measured: bit-identical to
    PIL either way)."""
    args: dict[str, Any] = {"device": "mixed" if gpu else "cpu", "jpeg_fancy_upsampling": True}
    if gpu:
        args["hw_decoder_load"] = float(cfg.dali_hw_decoder_load)
    return args


#: Bilinear with antialiasing when shrinking, as PIL's resize; float output, unrounded (faster on
#: the CPU than rounding to uint8 and converting again).
_RESIZE = dict(interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)


def window_roi(window: np.ndarray, height: int, width: int) -> tuple[np.ndarray, ...]:
    """For (n, 2) crop windows' (top, left) on the (height, width) resized image (negative or
    beyond it by up to the padding): the part of the resized image inside each window, as its
    size (visible), a relative ROI of the decoded image (start, end), and where
    crop_mirror_normalize puts it (crop position 1 pads the top (left) when the window starts
    above (left of) the image, 0 pads the bottom (right)); float32, for :func:`resize_window`
    and :func:`pad_mirror_normalise`."""
    size = np.array([height, width], dtype=np.float32)
    visible = (size - np.abs(window)).astype(np.float32)
    roi_start = (np.maximum(window, 0) / size).astype(np.float32)
    roi_end = (roi_start + visible / size).astype(np.float32)
    return visible, roi_start, roi_end, (window < 0).astype(np.float32)


def resize_window(x, visible, roi_start, roi_end):
    """Resize only the part of the image inside the crop window (:func:`window_roi`): the same
    pixel grid as resizing the whole image, then cutting the window."""
    return fn.resize(
        x, size=visible, roi_start=roi_start, roi_end=roi_end, roi_relative=True, **_RESIZE
    )


def pad_mirror_normalise(x, crop_pos, flip, height, width, mean, std, layout="CHW"):
    """Pad :func:`resize_window`'s part to the (height, width) window with black (pixel 0,
    written as its normalised value: BoT's zero padding), mirror flipped samples and normalise
    to float, one pass. ``mean`` and ``std`` per channel on the 0-255 scale."""
    return fn.crop_mirror_normalize(
        x,
        crop=[height, width],
        crop_pos_y=crop_pos[0],
        crop_pos_x=crop_pos[1],
        out_of_bounds_policy="pad",
        fill_values=[-m / s for m, s in zip(mean, std, strict=True)],
        mirror=flip,
        dtype=types.FLOAT,
        output_layout=layout,
        mean=mean,
        std=std,
    )


def _color_jitter(x, brightness, contrast, saturation):
    """:func:`hpc_reid.data.transforms.color_jitter` on DALI float HWC images in [0, 255] with
    per-sample factors: blend with black, with the mean grey (ITU-R 601-2 luma), with each
    pixel's grey, clamping after each step, as torchvision's tensor ops."""

    def grey(y):
        return y[:, :, 0] * LUMA[0] + y[:, :, 1] * LUMA[1] + y[:, :, 2] * LUMA[2]

    x = dmath.clamp(x * brightness, 0.0, 255.0)
    x = dmath.clamp(contrast * x + (1.0 - contrast) * fn.reductions.mean(grey(x)), 0.0, 255.0)
    grey_px = fn.expand_dims(grey(x), axes=[2], new_axis_names="C")
    return dmath.clamp(saturation * x + (1.0 - saturation) * grey_px, 0.0, 255.0)


def _build_pipeline(
    source: RankBatches,
    cfg: LoaderConfig,
    height: int,
    width: int,
    batch_size: int,
    gpu: bool,
    device_id: int | None,
    threads: int,
    workers: int,
    layout: str = "CHW",
):
    train = source.transform is not None
    jitter = train and source.transform.augment.color_jitter
    mean = [255.0 * m for m in cfg.augment.mean]
    std = [255.0 * s for s in cfg.augment.std]

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=cfg.prefetch,
        py_num_workers=max(workers, 1),
        # fork is not allowed once CUDA is initialised in this process
        py_start_method="spawn" if gpu else "fork",
    )
    def pipeline():
        outs = fn.external_source(
            source=source,
            num_outputs=(
                _NUM_SOURCE_TEST
                if not train
                else _NUM_SOURCE_JITTER
                if jitter
                else _NUM_SOURCE_TRAIN
            ),
            batch=True,
            batch_info=True,
            parallel=workers > 0,
        )
        jpegs, pids, camids, indices = outs[:4]
        x = fn.decoders.image(jpegs, output_type=types.RGB, **decoder_args(cfg, gpu))
        if not train:
            x = fn.resize(x, resize_x=width, resize_y=height, **_RESIZE)
            x = fn.crop_mirror_normalize(
                x, dtype=types.FLOAT, output_layout=layout, mean=mean, std=std
            )
            return x, pids, camids, indices
        if jitter:
            erase, flip, window, factors = outs[4:]
            # Colour jitter's contrast blends with the whole image's mean grey: resize it all,
            # jitter, then pad-and-crop as a slice with zero fill, mirror and normalise.
            x = fn.resize(x, resize_x=width, resize_y=height, **_RESIZE)
            if gpu:  # arithmetic takes its tensor inputs from the image's device
                factors = factors.gpu()
            x = _color_jitter(x, factors[0], factors[1], factors[2])
            x = fn.slice(
                x,
                start=window,
                shape=[height, width],
                axis_names="HW",
                out_of_bounds_policy="pad",
                fill_values=0.0,
            )
            x = fn.crop_mirror_normalize(
                x, mirror=flip, dtype=types.FLOAT, output_layout=layout, mean=mean, std=std
            )
            return x, pids, camids, indices, erase
        erase, flip, visible, roi_start, roi_end, crop_pos = outs[4:]
        x = resize_window(x, visible, roi_start, roi_end)
        x = pad_mirror_normalise(x, crop_pos, flip, height, width, mean, std, layout)
        return x, pids, camids, indices, erase

    pipe = pipeline()
    pipe.build()
    return pipe


def _to_torch(dali_out, device: torch.device, zero_copy: bool) -> torch.Tensor:
    """A pipeline output as a torch tensor on ``device``. With DALI's dynamic executor (the
    default) an output's memory lives as long as a reference to it, so torch takes it over
    through DLPack, as DALI's own PyTorch iterator does; otherwise it is copied."""
    t = dali_out.as_tensor()
    if zero_copy:
        with device:
            return torch.from_dlpack(t)
    dtype = torch.float32 if t.dtype == types.FLOAT else torch.int64
    arr = torch.empty(t.shape(), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    feed_ndarray(t, arr, cuda_stream=stream)
    return arr


class _DaliLoader:
    """``batch_size`` samples a batch; ``seq_len``: frames per sample for training tracklets
    (batches of (B, T, C, H, W)), None for images."""

    def __init__(
        self,
        records,
        cfg,
        height,
        width,
        device,
        batch_size,
        channels_last: bool = False,
        seq_len: int | None = None,
    ) -> None:
        self.records, self.cfg, self.channels_last = list(records), cfg, bool(channels_last)
        self.height, self.width, self.batch_size = int(height), int(width), int(batch_size)
        self.seq_len = seq_len
        self.gpu, self.device_id = _dali_device(device)
        self.device = torch.device("cuda", self.device_id) if self.gpu else torch.device("cpu")

    def _pipelines(self, **source_args) -> list[tuple[Any, RankBatches]]:
        """This loader's pipelines, each with the :class:`RankBatches` of its shard."""
        n, threads, workers = pipeline_layout(self.cfg, self.gpu)
        pipes = []
        for k in range(n):
            source = RankBatches(self.records, shard=k, shards=n, **source_args)
            pipe = _build_pipeline(
                source,
                self.cfg,
                self.height,
                self.width,
                self.batch_size * (self.seq_len or 1),  # images a batch
                self.gpu,
                self.device_id,
                threads,
                workers,
                "HWC" if self.channels_last else "CHW",
            )
            pipes.append((pipe, source))
        return pipes

    def _take(self, pipes: list, start: int, count: int) -> Iterator[dict[str, torch.Tensor]]:
        """Stream batches ``start`` .. ``start + count - 1``; batch b is pipeline b's turn,
        ``b % len(pipes)``."""
        cpu = torch.device("cpu")
        for b in range(start, start + count):
            pipe, source = pipes[b % len(pipes)]
            try:
                outs = pipe.run()
            except StopIteration:
                raise RuntimeError(
                    f"DALI pipeline {b % len(pipes)} of {len(pipes)} stopped at batch {b} of "
                    f"{start + count}; its source and the loader's length disagree"
                ) from None
            except RuntimeError as e:
                named = _decode_error(e, source, b)
                if named is None:
                    raise
                raise named from e
            zero_copy = bool(getattr(pipe, "exec_dynamic", False))
            images = _to_torch(outs[0], self.device, zero_copy)
            if self.channels_last:  # NHWC memory seen as NCHW: torch's channels_last
                images = images.permute(0, 3, 1, 2)
            labels = [_to_torch(o, cpu, zero_copy) for o in outs[1:4]]
            if len(outs) > 4:
                erase_(images, outs[4].as_array())
            if self.seq_len is not None:  # B T frames, T a tracklet: (B, T, C, H, W), a view
                t = self.seq_len
                images = images.unflatten(0, (-1, t))
                labels = [x[::t].contiguous() for x in labels]
            yield {"images": images, **dict(zip(_OUTPUTS[1:], labels, strict=True))}


class DaliTrainLoader(_DaliLoader):
    """Training batches of ``sampler`` decoded and augmented by DALI; see the module docstring."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        sampler: PlannedBatchSampler,
        cfg: LoaderConfig,
        height: int,
        width: int,
        seed: int,
        device: torch.device | str | None = None,
        channels_last: bool = False,
        video: VideoConfig | None = None,
    ) -> None:
        seq_len = video.seq_len if video is not None else None
        super().__init__(
            records, cfg, height, width, device, sampler.batch_size, channels_last, seq_len
        )
        self.sampler, self.seed, self.video = sampler, int(seed), video
        self.transform = TrainTransform(cfg.augment, height, width)
        self._pipes: list | None = None
        self._served = 0  # stream batches taken from the pipelines
        self._next: tuple[int, int] | None = None  # (epoch, first) the pipelines continue with

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s = self.sampler
        epoch, first = s.epoch, s.batches_per_epoch - len(s)
        if len(s) == 0:
            return iter(())
        if self._pipes is None or self._next != (epoch, first):
            self._pipes = None  # release the old pipelines (and their workers) first
            self._pipes = self._pipelines(
                sampler=s,
                transform=self.transform,
                epoch=epoch,
                first=first,
                seed=self.seed,
                batch_size=self.batch_size,
                video=self.video,
            )
            self._served = 0
        return self._run(self._pipes, epoch, len(s))

    def _run(self, pipes: list, epoch: int, count: int) -> Iterator[dict[str, torch.Tensor]]:
        self._next = None  # until the epoch ends, the pipelines cannot continue elsewhere
        for batch in self._take(pipes, self._served, count):
            self._served += 1
            yield batch
        if pipes is self._pipes:
            self._next = (epoch + 1, 0)


class DaliTestLoader(_DaliLoader):
    """Test batches: records in order, ``test_batch_size`` each (the last may be smaller)."""

    def __init__(self, records, cfg, height, width, device=None) -> None:
        super().__init__(records, cfg, height, width, device, cfg.test_batch_size)

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.records:
            return iter(())
        pipes = self._pipelines(sampler=None, transform=None, batch_size=self.batch_size)
        return self._take(pipes, 0, len(self))


def build_train_loader(
    records: Sequence[Record],
    batch_sampler: PlannedBatchSampler,
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    seed: int,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    video: VideoConfig | None = None,
) -> DaliTrainLoader:
    """DALI training loader with the torch loader's arguments, batches and augmentation.

    ``device``: where images are decoded and returned; None means CUDA when available.
    ``channels_last``: the pipeline writes NHWC, returned as NCHW tensors in torch's
    channels_last memory format (the model's, without a transposing copy per step); for
    tracklets (B, T, C, H, W) with channels_last frames (:mod:`.tracklets`). Tracklet records
    need ``video``, the run's ``data.video``.
    """
    tracklets = require_video(records, video, "the DALI training loader")
    lacking = [name for name in _SAMPLER_READS if not hasattr(batch_sampler, name)]
    if lacking:
        raise TypeError(
            f"the DALI loader needs a batch sampler that replans any epoch (a sampler of "
            f"hpc_reid.data.samplers: build_sampler), got {type(batch_sampler).__name__}, which "
            f"lacks {lacking}"
        )
    if batch_sampler.num_records != len(records):
        raise ValueError(
            f"the batch sampler was built over {batch_sampler.num_records} records but the "
            f"loader got {len(records)}; build both from the same training split"
        )
    video = video if tracklets else None  # an image set ignores data.video
    return DaliTrainLoader(
        records, batch_sampler, cfg_loader, height, width, seed, device, channels_last, video
    )


def build_test_loader(
    records: Sequence[Record],
    cfg_loader: LoaderConfig,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    video: VideoConfig | None = None,
) -> DaliTestLoader | ClipBatches:
    """DALI test loader: resize and normalise, records in order, last batch included.

    Tracklet records need ``video``: batches of their dense clips, (N, T, C, H, W) with each
    clip's tracklet index (:mod:`.tracklets`), the clips' frames decoded as test images."""
    if require_video(records, video, "the DALI test loader"):
        frames, owners = clip_frames(records, video)
        size = clips_per_batch(cfg_loader, video) * video.seq_len
        cfg = cfg_loader.model_copy(update={"test_batch_size": size})
        return ClipBatches(
            DaliTestLoader(frames, cfg, height, width, device), owners, video.seq_len
        )
    return DaliTestLoader(records, cfg_loader, height, width, device)
