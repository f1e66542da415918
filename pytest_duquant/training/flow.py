"""The flow-matching objective of pi0 / pi0.5 (openpi ``PI0Pytorch.forward``), with gradients.

x_t = t * noise + (1 - t) * actions, target u_t = noise - actions, t ~ Beta(1.5, 1) * 0.999 + 0.001;
the model predicts v_t from one joint pass over prefix (images + prompt) and suffix (noisy actions),
with the same masks and positions as :meth:`Pi05Model.joint_velocity` (which is inference-only).
Sampling then integrates v from t = 1 to 0 in ``num_steps`` Euler steps (``Pi05Model.sample_actions``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fused_attention lives with the model (the fast inference path uses it too); re-exported for training
from pytest_duquant.policies.pi05.modeling import Pi05Model, attention, fused_attention

__all__ = ["FlowMatchingLoss", "flow_matching_loss", "fused_attention", "sample_time", "velocity"]


def sample_time(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """t ~ Beta(1.5, 1) * 0.999 + 0.001, drawn through the inverse CDF (x^1.5) so that it is seeded."""
    u = torch.rand(batch, generator=generator, device=generator.device).to(device)
    return u.pow(1.0 / 1.5) * 0.999 + 0.001


def velocity(
    model: Pi05Model, images, image_masks, tokens, token_masks, x_t, time, attn=attention
) -> torch.Tensor:
    """v_t [B, H, action_dim] (float32) from a joint prefix + suffix pass (differentiable)."""
    return model.joint_forward(images, image_masks, tokens, token_masks, x_t, time, attn=attn)[0]


def flow_matching_loss(
    model: Pi05Model, batch: dict[str, torch.Tensor], generator: torch.Generator, attn=attention
) -> torch.Tensor:
    """Mean squared error between predicted and target velocity. batch: images, image_masks, tokens,
    token_masks, actions (normalized, [B, H, action_dim]). `attn`: the attention function (eager or
    :func:`fused_attention`)."""
    actions = batch["actions"]
    b = actions.shape[0]
    noise = torch.randn(actions.shape, generator=generator, device=generator.device).to(actions.device)
    t = sample_time(b, generator, actions.device)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    u_t = noise - actions
    v_t = velocity(
        model, batch["images"], batch["image_masks"], batch["tokens"], batch["token_masks"], x_t, t, attn
    )
    return F.mse_loss(v_t, u_t)


class FlowMatchingLoss(torch.nn.Module):
    """The loss as a module's forward, so that DistributedDataParallel sees (and syncs) the whole step."""

    def __init__(self, model: Pi05Model, attn=attention):
        super().__init__()
        self.model = model
        self.attn = attn

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return flow_matching_loss(self.model, batch, generator, self.attn)
