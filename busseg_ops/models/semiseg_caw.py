"""SemiSeg-CAW (Barzegar & Khan 2025): class-level guidance (ClassElevateSeg) and adaptive loss weights
(WGM). The paper gives the stages, not the layers: our design choices are in docs/methods.md."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deeplab import DeepLabV3Plus
from .inputs import input_adapter
from .malunet import MALUNet
from .unet import UNet
from .unext import UNeXt

ARCHS = {"deeplab": DeepLabV3Plus, "unet": UNet, "malunet": MALUNet, "unext": UNeXt}


def stage_channels(net: nn.Module) -> list:
    """Channels of the four ``feats`` maps of a segmentation network here, shallow → deep."""
    if isinstance(net, DeepLabV3Plus):
        return net.backbone.channels
    if isinstance(net, UNet):
        return net.encoder.channels
    return net.channels


class SegClassNet(nn.Module):
    """Segmentation network + GAP/FC classifier on the deepest stage map.
    ``forward(x, **flags)`` → the segmentation dict plus ``cls`` (B, num_labels). ``arch``:
    deeplab, unet, or the paper's backbones malunet and unext (their deepest map: the bottleneck)."""

    def __init__(
        self, num_classes: int = 2, num_labels: int = 2, arch: str = "deeplab", in_channels: int = 3, **kwargs
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {', '.join(map(repr, ARCHS))}, got {arch!r}")
        self.seg = ARCHS[arch](num_classes, in_channels=in_channels, **kwargs)
        self.fc = nn.Linear(stage_channels(self.seg)[-1], num_labels)

    def forward(self, x, need_feats: bool = False, **flags) -> dict:
        out = self.seg(x, need_feats=True, **flags)
        out["cls"] = self.fc(out["feats"][-1].mean(dim=(2, 3)))
        if not need_feats:
            del out["feats"]
        return out


def layercam(feature: torch.Tensor, score: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """LayerCAM (Jiang et al., IEEE TIP 2021) of the class scores ``score`` (B,) at the feature map
    ``feature`` (B, K, h, w), a tensor of the graph that computed them: per image
    M = ReLU(Σ_k ReLU(∂y_c/∂A_k) ⊙ A_k), bilinearly resized to ``size`` when given, then min-max
    normalised to [0, 1] (a constant map → 0); (B, 1, ...), detached, at least float32. The images'
    scores are summed for one backward: each image's map is its own only when nothing mixes the
    images (BatchNorm in eval mode)."""
    (grad,) = torch.autograd.grad(score.sum(), feature, retain_graph=True)
    cam = F.relu((F.relu(grad) * feature).sum(1, keepdim=True)).detach()
    cam = cam.to(torch.promote_types(cam.dtype, torch.float32))  # a bfloat16 map (autocast): normalised in float32
    if size is not None:
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    low = cam.amin(dim=(2, 3), keepdim=True)
    span = cam.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny), 0.0)


GUIDE_MAPS = ("segmentation", "layercam")
# LayerCAM's layer, by the module whose input is the map it reads, on the classifier's path, before the
# map the classifier pools (there LayerCAM is plain CAM; docs/methods.md): MALUNet's and UNeXt's stride-16
# map (their deepest: 32; MALUNet's skips after its attention bridge are off that path); for the stand-ins
# the map their deepest stage takes (U-Net's pooled stride-16 map, ResNet's layer3 output)
LAYERCAM_INPUT_OF = {
    MALUNet: "encoder5",
    UNeXt: "patch_embed4",
    UNet: "encoder.down.3",
    DeepLabV3Plus: "backbone.layer4",
}


class ClassElevateSeg(SegClassNet):
    """Stage-1 auxiliary network; adds ``aux``, the guide map (B, 1, H, W) in [0, 1] at the input
    size: by ``guide_map`` its foreground probability (``segmentation``, the paper's) or the
    LayerCAM of its classifier's predicted class at the input of ``LAYERCAM_INPUT_OF[arch]``
    (``layercam``, the paper's ablation "LayerCAM instead of ClassElevateSeg"; :func:`layercam`);
    the LayerCAM map is detached and takes its gradient even under ``torch.no_grad``.
    ``need_guide=False``: no ``aux`` (its stage-1 training needs only the heads)."""

    def __init__(self, *args, guide_map: str = "segmentation", **kwargs):
        super().__init__(*args, **kwargs)
        if guide_map not in GUIDE_MAPS:
            raise ValueError(f"guide_map: expected one of {', '.join(map(repr, GUIDE_MAPS))}, got {guide_map!r}")
        self.guide_map = guide_map

    def layercam_input(self) -> nn.Module:
        """The module whose input LayerCAM reads (a name, not an attribute: no second state-dict entry)."""
        return self.seg.get_submodule(LAYERCAM_INPUT_OF[type(self.seg)])

    def forward(self, x, need_guide: bool = True, **flags) -> dict:
        if not (need_guide and self.guide_map == "layercam"):
            out = super().forward(x, **flags)
            if need_guide:
                out["aux"] = 1 - torch.softmax(out["pred"], dim=1)[:, :1]
            return out
        seen = []
        hook = self.layercam_input().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            with torch.enable_grad():  # the frozen network under no_grad too: a graph for ∂y_c/∂A alone
                if not x.requires_grad:
                    x = x.detach().requires_grad_()
                out = super().forward(x, **flags)
                cls = out["cls"]
                score = cls.gather(1, cls.argmax(1, keepdim=True))[:, 0]
                out["aux"] = layercam(seen[0], score, x.shape[-2:]).to(x.dtype)
        finally:
            hook.remove()
        return out


class SemiSegCAW(nn.Module):
    """Main network guided by ClassElevateSeg (concatenated guide channel). ``forward(x)`` →
    ``pred``, ``cls`` of the main network, ``aux`` (the guide used) and, when the auxiliary net is
    trained jointly, ``aux_pred`` / ``aux_cls``. ``forward_aux(x)`` (or ``forward(x, aux_only=True)``): the
    auxiliary network alone (its stage-1 training). ``gray_input`` as in :class:`DeepLabV3Plus`, applied once, before
    both networks. ``guide=False`` (the paper's ablation "removing ClassElevateSeg"): no auxiliary
    network, the main network takes the image alone (``aux`` is None). ``guide_map``: how
    ClassElevateSeg reads its guide map off (:class:`ClassElevateSeg`)."""

    def __init__(
        self,
        num_classes: int = 2,
        num_labels: int = 2,
        arch: str = "deeplab",
        in_channels: int = 3,
        aux: ClassElevateSeg | None = None,
        freeze_aux: bool = True,
        gray_input: bool = False,
        guide: bool = True,
        guide_map: str = "segmentation",
        **kwargs,
    ):
        super().__init__()
        if aux is not None and not guide:
            raise ValueError("aux: given, but guide=False builds no auxiliary network")
        self.input = input_adapter(in_channels, gray_input)
        if guide and aux is None:
            aux = ClassElevateSeg(num_classes, num_labels, arch, in_channels, guide_map=guide_map, **kwargs)
        self.aux = aux
        self.main = SegClassNet(num_classes, num_labels, arch, in_channels + guide, **kwargs)
        self.freeze_aux = freeze_aux and guide
        if self.freeze_aux:
            self.aux.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_aux:
            self.aux.eval()
        return self

    def forward_aux(self, x, **flags) -> dict:
        if self.aux is None:
            raise ValueError("forward_aux: this SemiSegCAW was built with guide=False (no ClassElevateSeg)")
        return self.aux(self.input(x), **flags)

    def forward(self, x, aux_only: bool = False, **flags) -> dict:
        if aux_only:
            return self.forward_aux(x, **flags)
        x = self.input(x)
        if self.aux is None:
            return self.main(x, **flags)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_aux):
            aux = self.aux(x)
        out = self.main(torch.cat([x, aux["aux"]], dim=1), **flags)
        out["aux"] = aux["aux"]
        if not self.freeze_aux:
            out["aux_pred"], out["aux_cls"] = aux["pred"], aux["cls"]
        return out


class WeightGenerationModule(nn.Module):
    """Trainable, always-positive weights for ``num_losses`` task losses.
    ``forward(losses)`` → (total, weights): total = Σ exp(−s_i)·L_i + s_i over the losses that are
    not None, weights = exp(−s) (detached, for logging)."""

    def __init__(self, num_losses: int, init_log_var: float = 0.0):
        super().__init__()
        if num_losses < 1:
            raise ValueError(f"num_losses: expected ≥ 1, got {num_losses}")
        self.log_vars = nn.Parameter(torch.full((num_losses,), float(init_log_var)))

    def forward(self, losses: Sequence[torch.Tensor | None]):
        if len(losses) != self.log_vars.numel():
            raise ValueError(f"losses: expected {self.log_vars.numel()} task losses, got {len(losses)}")
        present = torch.tensor([l is not None for l in losses], device=self.log_vars.device)
        if not present.any():
            raise ValueError("losses: every task loss is None")
        stacked = torch.stack(
            [
                torch.as_tensor(
                    0.0 if l is None else l, dtype=self.log_vars.dtype, device=self.log_vars.device
                ).reshape(())
                for l in losses
            ]
        )
        weights = torch.exp(-self.log_vars)
        # an absent task (None) adds nothing, not even its s_i (which would otherwise fall for ever)
        return torch.where(present, weights * stacked + self.log_vars, 0.0).sum(), weights.detach()


def imtl_gradient_weights(grads: torch.Tensor) -> torch.Tensor:
    """IMTL-G's closed form (Liu et al., ICLR 2021): for task gradients ``grads`` (T, P) on the shared
    parameters, the weights α (T,), Σ α = 1, whose combination d = Σ α_t g_t has equal projections
    d·u_t on every unit gradient u_t = g_t / ‖g_t‖: with D = [g_1 − g_t]_t≥2 and U = [u_1 − u_t]_t≥2,
    α_2..T = g_1 Uᵀ (D Uᵀ)⁺ and α_1 = 1 − Σ α_2..T (pseudo-inverse: two equal gradients make D Uᵀ
    singular). A task with a zero gradient (its loss flat here) has no direction: weight 0. In float64."""
    g = grads.double()
    norms = g.norm(dim=1)
    live = (norms > 0).nonzero()[:, 0]
    alpha = torch.zeros(len(g), dtype=torch.float64, device=g.device)
    if len(live) == 0:  # every gradient zero: the combination is zero whatever α
        return alpha.fill_(1 / len(g))
    g, u = g[live], g[live] / norms[live, None]
    d, un = g[:1] - g[1:], u[:1] - u[1:]
    rest = (g[0] @ un.T) @ torch.linalg.pinv(d @ un.T)
    alpha[live] = torch.cat([1 - rest.sum(0, keepdim=True), rest])
    return alpha


class IMTL(nn.Module):
    """Impartial multi-task learning (Liu et al., ICLR 2021), the hybrid of its two halves.
    IMTL-L: learnable log scales s_t, task loss L̃_t = e^{s_t}·L_t − s_t (the scales settle where
    e^{s_t}·L_t = 1). IMTL-G: the parameters every present task reaches (``shared``) get
    Σ α_t ∇L̃_t with α from :func:`imtl_gradient_weights`; the others (a task's own head) and the
    scales get the plain Σ ∇L̃_t. ``forward(losses, shared)`` → (total, scales, α): total's value is
    Σ L̃_t, its gradient the above (a correction term of value 0 moves the shared gradient, so one
    backward, under a loss scaler too, applies it); scales = e^{s}, α (T,) detached, 0 for an absent
    task (None)."""

    def __init__(self, num_losses: int):
        super().__init__()
        if num_losses < 1:
            raise ValueError(f"num_losses: expected ≥ 1, got {num_losses}")
        self.log_scales = nn.Parameter(torch.zeros(num_losses))

    def forward(self, losses: Sequence[torch.Tensor | None], shared: Sequence[torch.Tensor]):
        if len(losses) != self.log_scales.numel():
            raise ValueError(f"losses: expected {self.log_scales.numel()} task losses, got {len(losses)}")
        present = [t for t, loss in enumerate(losses) if loss is not None]
        if not present:
            raise ValueError("losses: every task loss is None")
        scaled = {t: torch.exp(self.log_scales[t]) * losses[t].reshape(()) for t in present}
        total = sum(scaled[t] - self.log_scales[t] for t in present)
        alpha = torch.zeros(len(losses), device=self.log_scales.device)
        shared = [p for p in shared if p.requires_grad]
        if len(present) == 1 or not shared:
            alpha[present] = 1.0
            return total, torch.exp(self.log_scales).detach(), alpha
        grads = [torch.autograd.grad(scaled[t], shared, retain_graph=True, allow_unused=True) for t in present]
        common = [i for i in range(len(shared)) if all(g[i] is not None for g in grads)]
        if not common:  # no parameter every task reaches: nothing to balance
            alpha[present] = 1.0
            return total, torch.exp(self.log_scales).detach(), alpha
        flat = torch.stack([torch.cat([g[i].reshape(-1) for i in common]) for g in grads])
        weights = imtl_gradient_weights(flat).to(flat.dtype)
        alpha[present] = weights.to(alpha.dtype)
        # the backward of Σ L̃_t gives the shared parameters Σ_t g_t; this term adds Σ_t (α_t − 1) g_t
        extra = torch.einsum("t,tp->p", weights - 1, flat)
        correction, offset = 0.0, 0
        for i in common:
            n = shared[i].numel()
            correction = correction + (shared[i] * extra[offset : offset + n].view_as(shared[i])).sum()
            offset += n
        return total + correction - correction.detach(), torch.exp(self.log_scales).detach(), alpha
