"""SAN's decoder losses: ``loss.texture`` and ``loss.decoder_triplet``.

Jin, Lan, Zeng, Wei and Chen, "Semantics-Aligned Representation Learning for Person
Re-identification", AAAI 2020 (arXiv 1905.13143); the released code's ``train()`` in main.py
(github.com/microsoft/Semantics-Aligned-Representation-Learning-for-Person-Re-identification) is
the reference where the paper body is out of reach (/work/shared/methods/san.md, 1.3):

- L_rec, the reconstruction loss: ``nn.L1Loss`` of the decoded texture against the image's
  (pseudo) ground-truth texture, both in [-1, 1] units. Under ``data.textures.missing: skip`` an
  image without a texture is left out of the mean (the batch field ``texture_valid``).
- L_TR, the "Triplet ReID constraints" on the four decoder block outputs, D(a, b) the MSE of two
  maps (mean over C, H, W), hinge max(D(a, p) - D(a, n) + 0.3, 0). The released code mines
  nothing: over a batch of P identities x K = 4 consecutive images it takes, for i = 0, 4, ...,
  (P - 2) x 4, one triplet a block at fixed offsets from i (:data:`FIXED_PATTERN`), and SUMS the
  hinges over the P - 1 groups and the 4 blocks (not a mean: at 16 x 4 that is 60 hinges, so the
  term is large next to L_rec; we keep the reference's scale). ``mining: hard`` is our option:
  batch-hard triplets (Hermans et al. 2017, Eq. 5) on the pairwise MSE, a mean over the anchors,
  summed over the blocks.

Neither side of a triplet is detached, as in the reference (its MSELoss backpropagates into
anchor, positive and negative).

Cost (no action needed): with the released R50 decoder at 256 x 128 input the four blocks are
256 x 32 x 16, 64 x 64 x 32, 32 x 128 x 64 and 16 x 256 x 128, 1 M floats (4 MiB in fp32) a
sample, 256 MiB for a batch of 64. The fixed pattern reads 3 (P - 1) of a block's B = 4P maps
(about 3/4 of the batch, as strided views, no gather copy) and writes two (P - 1)-map differences:
about 1.25 batches of maps a block forward, as much again backward. Hard mining centres the
batch (one read, one B-map temporary) and forms a B x B Gram matrix (one more read); no B^2 map
copies. Either is small next to the decoder's own forward and backward over the same maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hpc_reid.losses import register_loss
from hpc_reid.losses.triplet import triplet_masks, triplet_terms

#: the model outputs of the decoder's four up-sampling blocks (the released code's x_sim1..4)
DECODER_BLOCKS = ("decoder.1", "decoder.2", "decoder.3", "decoder.4")

#: images per identity the fixed pattern is written for (its offsets reach into the next group)
FIXED_K = 4

#: (anchor, positive, negative) offsets from i = 0, 4, ..., (P - 2) x 4, for blocks 1 to 4: the
#: released code's ``x_sim1[i], x_sim1[i+1] | x_sim1[i+4]`` ... and, for block 4,
#: ``MSE(x_sim4[i], x_sim4[i+3]) - MSE(x_sim4[i+3], x_sim4[i+4])``: anchor i + 3 (MSE is symmetric)
FIXED_PATTERN = ((0, 1, 4), (1, 2, 5), (2, 3, 6), (3, 0, 4))


def texture_l1_loss(
    predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """mean |predicted - target| over the samples where ``valid`` (B,) is True (all when None):
    ``nn.L1Loss`` of the samples with a texture. With none valid the result is a zero that still
    depends on ``predicted``, so every rank's backward reaches the decoder (DDP waits for every
    parameter's gradient). An invalid sample's target is never read into the value or the
    gradient: a placeholder (even NaN) there cannot leak in."""
    if predicted.shape != target.shape:
        raise ValueError(
            f"loss.texture: the decoded texture (model output 'texture') has shape "
            f"{tuple(predicted.shape)} and its target (batch field 'texture') "
            f"{tuple(target.shape)}; expected equal shapes (model.san.texture_size sets both)"
        )
    diff = predicted - target
    if valid is None:
        return diff.abs().mean()
    if valid.shape != predicted.shape[:1]:
        raise ValueError(
            f"loss.texture: batch field 'texture_valid' has shape {tuple(valid.shape)} for "
            f"{predicted.shape[0]} textures; expected ({predicted.shape[0]},)"
        )
    mask = valid.to(torch.bool).reshape(-1, *[1] * (diff.dim() - 1))
    # where(), not a product with the mask: 0 x NaN is NaN, and where's backward gives the
    # unselected side an exact zero
    diff = torch.where(mask, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    count = valid.sum().clamp(min=1) * diff[0].numel()
    return diff.abs().sum() / count


def _check_blocks(blocks: Sequence[torch.Tensor], pids: torch.Tensor) -> None:
    for i, x in enumerate(blocks, start=1):
        if x.dim() < 2 or x.shape[0] != pids.shape[0]:
            raise ValueError(
                f"loss.decoder_triplet: model output 'decoder.{i}' has shape {tuple(x.shape)} "
                f"for {pids.shape[0]} pids; expected (B, C, H, W) with B = {pids.shape[0]}"
            )


def check_fixed_layout(pids: torch.Tensor, k: int = FIXED_K) -> None:
    """A ValueError unless ``pids`` is P >= 2 groups of ``k`` consecutive equal pids, each group's
    pid other than the next group's: the layout the fixed pattern's positives and negatives assume
    (an identity sampler with num_instances=4). A random batch would silently get "positives" of
    other identities. On an accelerator this reads B pids back to the host, once a step."""
    values = pids.detach().cpu().reshape(-1)
    b = len(values)
    problem = ""
    if b % k or b < 2 * k:
        problem = f"a batch of {b} images is not P >= 2 identities x {k}"
    else:
        groups = values.reshape(-1, k)
        mixed = (groups != groups[:, :1]).any(1).nonzero().flatten().tolist()
        repeated = (groups[1:, 0] == groups[:-1, 0]).nonzero().flatten().tolist()
        if mixed:
            g = mixed[0]
            problem = f"images {g * k}..{g * k + k - 1} have pids {groups[g].tolist()}"
        elif repeated:
            g = repeated[0]
            images = f"images {g * k}..{g * k + 2 * k - 1}"
            problem = f"groups {g} and {g + 1} ({images}) share pid {int(groups[g, 0])}"
    if problem:
        shown = values[:16].tolist()
        raise ValueError(
            f"loss.decoder_triplet.mining=fixed is the released code's index pattern over a batch "
            f"of P identities x {k} consecutive images, each group of {k} one identity and the "
            f"next group another; {problem} (batch pids {shown}{' ...' if b > 16 else ''}). Use "
            f"sampler.kind=identity with sampler.num_instances={k}, or "
            f"loss.decoder_triplet.mining=hard"
        )


def fixed_pattern_triplet_loss(
    maps: torch.Tensor, offsets: tuple[int, int, int], margin: float, k: int = FIXED_K
) -> torch.Tensor:
    """SUM over i = 0, k, ..., (P - 2) k of max(D(a, p) - D(a, n) + margin, 0), (a, p, n) = i +
    ``offsets``, D the MSE of two maps of ``maps`` (B, ...), B = P k (the layout is the caller's:
    :func:`check_fixed_layout`). Anchor and positive index group g, the negative group g + 1."""
    a, p, n = offsets
    if not (0 <= a < k and 0 <= p < k and k <= n < 2 * k):
        raise ValueError(
            f"offsets {offsets}: expected anchor and positive in [0, {k}), "
            f"negative in [{k}, {2 * k})"
        )
    groups = maps.reshape(maps.shape[0] // k, k, -1)  # (P, k, C*H*W); a view when contiguous
    anchor, positive, negative = groups[:-1, a], groups[:-1, p], groups[1:, n - k]
    d_ap = (anchor - positive).pow(2).mean(-1)
    d_an = (anchor - negative).pow(2).mean(-1)
    return F.relu(d_ap - d_an + margin).sum()


def pairwise_mse(maps: torch.Tensor) -> torch.Tensor:
    """(B, B) MSE between every two maps of ``maps`` (B, ...): (|a|^2 + |b|^2 - 2 a.b) / n on the
    flattened maps, one Gram matrix instead of B^2 map differences. The maps are first centred on
    the batch mean (D only depends on differences): the expansion then cancels small numbers, not
    the square of a common offset, and keeps float32 close to the direct difference. Clamped at 0
    (rounding may dip below)."""
    flat = maps.flatten(1)
    flat = flat - flat.mean(0, keepdim=True)
    sq = flat.pow(2).sum(1)
    gram = flat @ flat.t()
    return ((sq[:, None] + sq[None, :] - 2.0 * gram) / flat.shape[1]).clamp(min=0.0)


def batch_hard_mse_triplet_loss(
    maps: torch.Tensor, pids: torch.Tensor, margin: float
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017, Eq. 5) with the pairwise MSE of ``maps`` as
    the distance: for each anchor its farthest positive and nearest negative, the mean hinge over
    the anchors that have both (0 when none)."""
    dist = pairwise_mse(maps)
    index = torch.arange(len(pids), device=pids.device)
    pos, neg, valid = triplet_masks(pids, pids, index)
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    terms = triplet_terms(d_ap, d_an, valid, margin)
    return terms.sum() / valid.sum().clamp(min=1)


def decoder_triplet_loss(
    blocks: Sequence[torch.Tensor], pids: torch.Tensor, margin: float = 0.3, mining: str = "fixed"
) -> torch.Tensor:
    """L_TR over the decoder's block outputs ``blocks`` (each (B, C_i, H_i, W_i)), summed over
    the blocks. ``mining``: fixed, the released code's pattern, block i with
    ``FIXED_PATTERN[i]`` (4 blocks; the batch layout checked); hard, batch-hard on each block."""
    _check_blocks(blocks, pids)
    if mining == "fixed":
        if len(blocks) != len(FIXED_PATTERN):
            raise ValueError(
                f"loss.decoder_triplet.mining=fixed has one pattern for each of "
                f"{len(FIXED_PATTERN)} decoder blocks; got {len(blocks)} blocks"
            )
        check_fixed_layout(pids)
        values = [
            fixed_pattern_triplet_loss(x, offsets, margin)
            for x, offsets in zip(blocks, FIXED_PATTERN, strict=True)
        ]
    elif mining == "hard":
        values = [batch_hard_mse_triplet_loss(x, pids, margin) for x in blocks]
    else:
        raise ValueError(f"loss.decoder_triplet.mining={mining!r}: expected 'fixed' or 'hard'")
    return sum(values[1:], start=values[0])


@register_loss("texture", inputs=("texture",), batch_fields=("texture", "texture_valid"))
def _texture(section, num_classes: int, feature_dim: int):
    def texture(outputs, pids, batch):
        return texture_l1_loss(outputs["texture"], batch["texture"], batch["texture_valid"])

    return texture


@register_loss("decoder_triplet", inputs=DECODER_BLOCKS)
def _decoder_triplet(section, num_classes: int, feature_dim: int):
    def decoder_triplet(outputs, pids):
        blocks = [outputs[key] for key in DECODER_BLOCKS]
        return decoder_triplet_loss(blocks, pids, section.margin, section.mining)

    return decoder_triplet
