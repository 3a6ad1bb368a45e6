"""A MetaMask step that behaves like the authors' research script, written here from SPEC §1.

It keeps the authors' costs on purpose, because every speed claim of metamask_fast is measured against it
side by side and the tests use it (in float64) as an oracle of the step order:

- a shadow deep copy of the network that receives the virtual weights θ';
- per-parameter Python loops for the virtual step and the finite-difference perturbation;
- a deep copy of the gradient list and of each momentum buffer every step;
- full forwards of both heads even where only the contrastive loss is used;
- the Barlow Twins loss through the full D × D matrix, a fresh ``torch.eye`` and boolean mask per call;
- NT-Xent with ``1e9 · I`` subtracted from the self-similarities.

The unused prediction MLPs of the authors' model are left out: they do not change any number.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def authors_barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """The authors' Barlow Twins loss: unbiased-std standardisation and the D × D matrix."""
    n, d = z_a.shape
    a = (z_a - z_a.mean(0)) / z_a.std(0)
    b = (z_b - z_b.mean(0)) / z_b.std(0)
    c = a.T @ b / n
    c_diff = (c - torch.eye(d, device=c.device, dtype=c.dtype)).pow(2)
    c_diff[~torch.eye(d, dtype=torch.bool, device=c.device)] *= lambd
    return c_diff.sum()


def authors_nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """The authors' contrastive loss: two cross-entropies over [cross-view, same-view - 1e9·I] logits."""
    n = z_a.shape[0]
    targets = torch.arange(n, device=z_a.device)
    big_eye = torch.eye(n, device=z_a.device, dtype=z_a.dtype) * 1e9
    a = F.normalize(z_a, p=2, dim=1)
    b = F.normalize(z_b, p=2, dim=1)
    logits_aa = a @ a.T / temperature - big_eye
    logits_bb = b @ b.T / temperature - big_eye
    logits_ab = a @ b.T / temperature
    logits_ba = b @ a.T / temperature
    return (
        F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), targets)
        + F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), targets)
    ) / 2


class AuthorsStyleMetaMaskStep:
    """One MetaMask training step in the authors' manner (SPEC §1, "faithful" order).

    ``model`` is a :class:`metamask_fast.models.MetaMaskModel`; ``net_optimizer`` an SGD over every
    parameter but ``model.mask.logits``; ``mask_optimizer`` an SGD over the mask. The mask is read from the
    real model in every forward, the network weights from the real model or from the shadow copy.
    """

    def __init__(self, model, net_optimizer, mask_optimizer, *, weight_cl=10.0, lambd=5e-3,
                 temperature=0.07, second_order=True, fd_radius=1e-2):
        self.model = model
        self.net_optimizer = net_optimizer
        self.mask_optimizer = mask_optimizer
        self.weight_cl = weight_cl
        self.lambd = lambd
        self.temperature = temperature
        self.second_order = second_order
        self.fd_radius = fd_radius
        self.shadow = copy.deepcopy(model)

    def _network_parameters(self, net):
        return [p for name, p in net.named_parameters() if not name.startswith("mask.")]

    def _forward_both_heads(self, net, x, mask):
        h = net.backbone(x).flatten(1) * mask[None, :]
        return net.bt_head(h), net.cl_head(h)

    def _contrastive_loss(self, net, x0, x1):
        mask = self.model.mask()
        _, z0 = self._forward_both_heads(net, x0, mask)
        _, z1 = self._forward_both_heads(net, x1, mask)
        return authors_nt_xent_loss(z0, z1, self.temperature)

    def step(self, x0, x1):
        model = self.model
        model.train()
        self.shadow.train()

        mask = model.mask()
        z0_bt, z0_cl = self._forward_both_heads(model, x0, mask)
        z1_bt, z1_cl = self._forward_both_heads(model, x1, mask)
        loss_bt = authors_barlow_twins_loss(z0_bt, z1_bt, self.lambd)
        loss_cl = authors_nt_xent_loss(z0_cl, z1_cl, self.temperature)
        loss = loss_bt + self.weight_cl * loss_cl
        self.net_optimizer.zero_grad()
        self.mask_optimizer.zero_grad()
        loss.backward()
        self.net_optimizer.step()
        self.net_optimizer.zero_grad()

        eta = self.net_optimizer.param_groups[0]["lr"]
        self._unrolled_backward(x0, x1, eta)
        self.mask_optimizer.step()
        self.mask_optimizer.zero_grad()
        return {"loss": loss.item(), "loss_bt": loss_bt.item(), "loss_cl": loss_cl.item()}

    def _unrolled_backward(self, x0, x1, eta):
        model, shadow = self.model, self.shadow
        loss = self._contrastive_loss(model, x0, x1)
        self.net_optimizer.zero_grad()
        self.mask_optimizer.zero_grad()
        loss.backward()
        gradients = copy.deepcopy(
            [p.grad.data if p.grad is not None else None for p in self._network_parameters(model)]
        )
        self.net_optimizer.zero_grad()
        self.mask_optimizer.zero_grad()

        group = self.net_optimizer.param_groups[0]
        with torch.no_grad():
            for weight, shadow_weight, d_p in zip(
                self._network_parameters(model), self._network_parameters(shadow), gradients
            ):
                if d_p is None:
                    shadow_weight.copy_(weight)
                    continue
                if group["weight_decay"] != 0:
                    d_p = d_p.add(weight, alpha=group["weight_decay"])
                buf = d_p
                if group["momentum"] != 0:
                    state = self.net_optimizer.state[weight]
                    if "momentum_buffer" in state:
                        buf = copy.deepcopy(state["momentum_buffer"])
                        buf.mul_(group["momentum"]).add_(d_p)
                shadow_weight.copy_(weight - buf * group["lr"])
                shadow_weight.grad = None

        loss = self._contrastive_loss(shadow, x0, x1)
        self.mask_optimizer.zero_grad()
        loss.backward()
        mask_grad = model.mask.logits.grad.clone()
        if self.second_order:
            vector = [p.grad.data if p.grad is not None else None for p in self._network_parameters(shadow)]
            mask_grad.sub_(self._hessian_vector_product(vector, x0, x1), alpha=eta)
        for p in self._network_parameters(shadow):
            p.grad = None
        model.mask.logits.grad = mask_grad

    def _hessian_vector_product(self, vector, x0, x1):
        model, shadow = self.model, self.shadow
        with torch.no_grad():
            for weight, shadow_weight in zip(self._network_parameters(model), self._network_parameters(shadow)):
                shadow_weight.copy_(weight)
        radius = self.fd_radius / torch.cat([v.reshape(-1) for v in vector if v is not None]).norm()
        with torch.no_grad():
            for p, v in zip(self._network_parameters(shadow), vector):
                if v is not None:
                    p.add_(v, alpha=radius)
        (grad_plus,) = torch.autograd.grad(self._contrastive_loss(shadow, x0, x1), [model.mask.logits])
        with torch.no_grad():
            for p, v in zip(self._network_parameters(shadow), vector):
                if v is not None:
                    p.sub_(v, alpha=2 * radius)
        (grad_minus,) = torch.autograd.grad(self._contrastive_loss(shadow, x0, x1), [model.mask.logits])
        return (grad_plus - grad_minus) / (2 * radius)
