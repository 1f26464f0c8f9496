"""EnginePerceptualLoss at its edges: second-order gradients are refused (never computed
wrong), inputs it cannot read are refused with what it accepts, and a model without
its gradient is told the export that fits it.

Uses the session's cached target graph with gradient (conftest.target_grad_cache).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_engine import Engine, EnginePerceptualLoss, TorchPerceptualLoss
from perceptual_engine.errors import InputError, ModelError, NotSupportedError

from conftest import TARGET_GRAD_LOSS, TARGET_GRAD_SPEC

SHAPE = (2, 3, 19, 23)


@pytest.fixture(scope="module")
def loss_and_images(target_grad_cache):
    *_, path = target_grad_cache
    rng = np.random.default_rng(4)
    c, s = (torch.from_numpy(rng.uniform(0, 1, (1, 3, 19, 23)).astype(np.float32)) for _ in range(2))
    x = torch.from_numpy(rng.uniform(0, 1, SHAPE).astype(np.float32))
    crit = EnginePerceptualLoss(path, device="cpu")
    crit.set_target(content=c, style=s)
    return crit, c, s, x


def test_gradient_penalty_is_refused_not_computed_wrong(loss_and_images):
    crit, c, s, x0 = loss_and_images
    ref = TorchPerceptualLoss(TARGET_GRAD_SPEC, TARGET_GRAD_LOSS)
    ref.set_target(content=c, style=s)
    lam = 0.3
    for take in ("backward", "autograd.grad"):
        x = x0.clone().requires_grad_()
        total = crit(x)["total"].sum()
        g, = torch.autograd.grad(total, x, create_graph=True)
        penalty = total + lam * (g ** 2).sum()
        with pytest.raises(NotSupportedError, match="first-order gradients only.*TorchPerceptualLoss"):
            if take == "backward":
                penalty.backward()
            else:
                torch.autograd.grad(penalty, x)
    # The reference does support it, and its penalty term is far from zero: an engine that
    # dropped it silently (the old behaviour) would have been off by that much.
    x = x0.clone().requires_grad_()
    total = ref(x)["total"].sum()
    g, = torch.autograd.grad(total, x, create_graph=True)
    second, = torch.autograd.grad(lam * (g ** 2).sum(), x)
    assert second.abs().max() > 1e-3 * g.abs().max()


def test_create_graph_alone_keeps_the_first_order_gradient(loss_and_images):
    crit, _, _, x0 = loss_and_images
    grads = []
    for create_graph in (False, True):
        x = x0.clone().requires_grad_()
        g, = torch.autograd.grad(crit(x)["total"].sum(), x, create_graph=create_graph)
        grads.append(g.detach())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_inputs_it_cannot_read_are_refused(loss_and_images):
    crit, c, _, x0 = loss_and_images
    with pytest.raises(InputError, match=r"got x of type ndarray; accepted: a torch\.Tensor.*torch\.from_numpy"):
        crit(x0.numpy())
    with pytest.raises(InputError, match="got x of type list"):
        crit(x0.tolist())
    with pytest.raises(InputError, match="got x on the meta device .* accepted: a tensor with data"):
        crit(torch.empty(SHAPE, device="meta"))
    with pytest.raises(InputError, match="meta device"):
        crit.set_target(content=torch.empty((1, 3, 19, 23), device="meta"))
    engine = crit.engine
    with pytest.raises(InputError, match="meta device"):
        engine.distance(torch.empty(SHAPE, device="meta"))
    assert crit(x0)["total"].shape == (2,)  # the target survived the refused set_target


def test_model_without_gradient_is_told_its_own_export(distance_model, features_model, style_model):
    with pytest.raises(ModelError, match=r"distance graph without grad\.x.*graph='distance'.*"
                                         r"export --graph distance --grad"):
        EnginePerceptualLoss(distance_model[0], device="cpu")
    for path in (features_model[0], style_model[0]):
        kind = Engine(path, device="cpu").info.graph
        with pytest.raises(ModelError, match=rf"is a {kind} graph, which is not exported with a gradient"):
            EnginePerceptualLoss(path, device="cpu")
