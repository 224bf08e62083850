"""Training losses: the denoising objective with the CompVis weighting, and DreamBooth's prior preservation."""

from __future__ import annotations

from typing import Literal

import torch


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: Literal["l1", "l2"]) -> torch.Tensor:
    """Mean over all but the batch dimension of |pred − target| (l1) or (pred − target)² (l2): shape (B,)."""
    diff = pred - target
    values = diff.abs() if loss_type == "l1" else diff.pow(2)
    return values.flatten(1).mean(dim=1)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    logvar: torch.Tensor,
    lvlb_weights: torch.Tensor,
    l_simple_weight: float = 1.0,
    original_elbo_weight: float = 0.0,
    loss_type: Literal["l1", "l2"] = "l2",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The CompVis LatentDiffusion objective (Ho et al. 2020, Eq. 14, with a learned-variance weighting).

    ``loss = l_simple_weight · mean(L_simple / exp(logvar_t) + logvar_t) + original_elbo_weight · mean(λ_t L_simple)``;
    with the SD defaults (logvar 0, elbo weight 0) this is the plain ε-prediction MSE.
    Returns the scalar loss and its parts (detached) for logging.
    """
    simple = per_sample_loss(pred.float(), target.float(), loss_type)  # (B,)
    logvar_t = logvar.to(t.device)[t]
    weighted = simple / torch.exp(logvar_t) + logvar_t
    loss = l_simple_weight * weighted.mean()
    vlb = (lvlb_weights.to(t.device)[t] * simple).mean()
    loss = loss + original_elbo_weight * vlb
    parts = {"loss_simple": simple.mean().detach(), "loss_vlb": vlb.detach(), "loss": loss.detach()}
    return loss, parts


def prior_preservation_loss(loss_train: torch.Tensor, loss_reg: torch.Tensor, reg_weight: float) -> torch.Tensor:
    """DreamBooth's objective (Ruiz et al. 2023, Eq. 2): subject term + λ · class-prior term."""
    return loss_train + reg_weight * loss_reg
