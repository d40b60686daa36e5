"""The busseg losses of a training step as one graph (issue 27, item 5): torch.compile(fullgraph=True)
of the rabusseg relation losses and of the phnet losses as the training step computes them, forward
and backward, equal to eager; on a GPU, the sync-free ops run under CUDA's sync check. The backend
is aot_eager: the whole computation is traced (a graph break fails), the graph runs ATen eagerly, so
CRA's random first proxy draws what the eager call draws. What stays eager, and why: docs/testing.md."""

import pytest
import torch
from train_helpers import tiny

import busseg_ops
from busseg_ops.train import engine, methods


def _leaves(obj):
    """obj with every floating tensor of a (nested) dict / list a fresh leaf requiring grad."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().requires_grad_(obj.is_floating_point())
    if isinstance(obj, dict):
        return {k: _leaves(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_leaves(v) for v in obj)
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for v in obj for t in _tensors(v)] if isinstance(obj, (list, tuple)) else []


def _assert_compiled_equals_eager(fn, *inputs):
    """fn compiled with fullgraph=True: its value and the gradients of every input that requires
    grad as in eager, with the same random numbers."""
    leaves = [t for t in _tensors(inputs) if t.requires_grad]
    torch.manual_seed(0)
    expected = fn(*inputs)
    expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    torch.manual_seed(0)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
    grads = torch.autograd.grad(got, leaves, allow_unused=True)
    torch.testing.assert_close(got, expected)
    assert sum(g is not None for g in expected_grads) > 0
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e)


def _student_outputs(cfg, batch=4, **heads):
    torch.manual_seed(0)
    student = engine.build_model(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, cfg.crop, cfg.crop, generator=g)
    targets = torch.randint(0, 2, (batch, cfg.crop, cfg.crop), generator=g)
    targets[0, :5] = 255  # ignored pixels, as the pseudo-labels have
    return _leaves(student(x, need_feats=True, **heads)), targets


@pytest.mark.parametrize("strategy", ["greedy", "random"])
def test_rabusseg_relation_losses_compile_whole(tmp_path, strategy):
    """L_ARP + L_CRA as RABUSSeg.__call__ computes them (the method's ARP and CRA modules on the
    student's outputs): proxy sampling, index mapping, gathering, both ops and their backward."""
    cfg = tiny(tmp_path, method="rabusseg", cra_strategy=strategy)
    method = methods.build(cfg)
    out, targets = _student_outputs(cfg, need_proj=True)

    def relation_losses(out, targets):
        loss_arp = method.arp.loss(out["proj"], out["pred"], targets)
        loss_cra = method.cra(out["feats"], out["proj"], label=targets)
        return cfg.rabusseg.lambda_arp * loss_arp + cfg.rabusseg.lambda_cra * loss_cra

    _assert_compiled_equals_eager(relation_losses, out, targets)


def test_phnet_losses_compile_whole(tmp_path):
    """PHNet.__call__'s teacher hardness for the shielded cutmix, its L_u
    (confidence_masked_cross_entropy) and its hard-patch contrastive loss as PHNet.contrastive
    calls memory_contrastive_loss on the selected anchors (the class centres of the memory bank as
    positives, a missing one None, the other class's centre as the negative)."""
    cfg = tiny(tmp_path, method="phnet")
    out, _ = _student_outputs(cfg, need_rep=True)
    g = torch.Generator().manual_seed(2)
    tprob = torch.softmax(torch.randn(4, 2, cfg.crop, cfg.crop, generator=g), 1)
    plm = tprob.argmax(1)
    anchors = torch.nn.functional.normalize(torch.randn(40, cfg.rep_dim, generator=g), dim=1).requires_grad_()
    labels = torch.randint(0, 2, (40,), generator=g)
    centres = [torch.randn(cfg.rep_dim, generator=g), torch.randn(cfg.rep_dim, generator=g)]

    def phnet_losses(pred_u, tprob, plm, anchors, labels, positives):
        with torch.no_grad():
            hardness = busseg_ops.patch_entropy_hardness(tprob, num_patches=cfg.phnet.num_patches)
        loss_u = busseg_ops.confidence_masked_cross_entropy(pred_u, plm, tprob, cfg.pseudo.gamma)
        negatives, negative_labels = torch.stack(positives), torch.arange(len(positives))
        loss_c = busseg_ops.memory_contrastive_loss(
            anchors, labels, negatives, negative_labels, positives, cfg.phnet.temperature
        )
        return loss_u + cfg.phnet.lambda_c * loss_c + 0 * hardness.sum()

    _assert_compiled_equals_eager(phnet_losses, out["pred"], tprob, plm, anchors, labels, centres)

    def contrastive_with_a_missing_centre(anchors, labels):  # an empty bank class: no positive
        return busseg_ops.memory_contrastive_loss(anchors, labels, anchors.detach(), labels, [centres[0], None])

    _assert_compiled_equals_eager(contrastive_with_a_missing_centre, anchors, labels)


def test_an_op_call_reads_nothing_back_from_the_device_under_compile(tmp_path):
    """No op front end reads tensor data on the host while torch.compile traces it: the range
    checks of gather_proxies and of greedy's first proxies are left to the kernels there."""
    feat = torch.randn(2, 3, 4, 5, requires_grad=True)
    first, idx = torch.tensor([0, 19]), torch.tensor([[0, 19, 7], [3, 3, 12]])

    def sample_and_gather(feat, first, idx):
        s = busseg_ops.greedy_proxy_sampling(feat, 3, first=first)
        return busseg_ops.gather_proxies(feat, idx).sum() + busseg_ops.gather_proxies(feat, s).sum()

    _assert_compiled_equals_eager(sample_and_gather, feat, first, idx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ops_do_not_synchronize_with_the_host(tmp_path):
    """What a CUDA graph of a training step needs: forward and backward of ARP, the CRA loss, the
    hardness and gather_proxies on the GPU without a host sync (torch's sync check raises on one).
    Greedy sampling's C++ range check of first and the contrastive driver's per-class nonzero
    still read the device (issue 27); they are not in this list until they do not."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 8, 9, 11, generator=g).cuda().requires_grad_()
    value = torch.randn(2, 2, 9, 11, generator=g).cuda().requires_grad_()
    proxies = [torch.randn(2, 5, 8, generator=g).cuda().requires_grad_() for _ in range(2)]
    idx = torch.randint(0, 99, (2, 5), generator=g).cuda()
    prob = torch.softmax(torch.randn(2, 2, 8, 8, generator=g), 1).cuda().requires_grad_()

    def step():
        losses = [
            busseg_ops.adjacent_relation_propagation(feat, value).square().mean(),
            busseg_ops.cross_layer_alignment_loss([feat, feat * 2], proxies),
            busseg_ops.patch_entropy_hardness(prob, num_patches=2).mean(),
            busseg_ops.gather_proxies(feat, idx).mean(),
        ]
        return torch.autograd.grad(sum(losses), [feat, value, prob, *proxies])

    for backend in ("cuda", "triton"):
        if backend not in busseg_ops.available_backends("cuda"):
            continue
        with busseg_ops.use_backend(backend):
            step()  # first calls: compilation, handles and other lazy set-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
