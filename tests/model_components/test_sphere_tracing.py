"""Sphere tracing against an analytic SDF with known hits."""

import torch

from cocoinr_nerfstudio.model_components.sphere_tracing import sphere_trace


def test_hits_and_misses_on_a_sphere():
    origins = torch.tensor([[0.0, 0.0, 2.0]]).expand(3, 3).contiguous()
    directions = torch.nn.functional.normalize(
        torch.tensor([[0.0, 0.0, -1.0], [0.2, 0.0, -1.0], [1.0, 0.0, 0.0]]), dim=-1
    )
    t, hit = sphere_trace(
        lambda p: p.norm(dim=-1, keepdim=True) - 0.5,
        origins,
        directions,
        nears=torch.zeros(3, 1),
        fars=torch.full((3, 1), 5.0),
    )
    assert hit.tolist() == [True, True, False]
    b = (origins * directions).sum(-1)
    expected = -b - torch.sqrt(b * b - (origins.pow(2).sum(-1) - 0.25))
    torch.testing.assert_close(t[:2, 0], expected[:2], atol=2e-3, rtol=0)


def test_overshooting_steps_are_bisected_back_to_the_surface():
    """An SDF that overestimates distance (slope 3) makes the tracer jump through; it must come back."""
    t, hit = sphere_trace(
        lambda p: 3.0 * (p[:, 2:3] - 1.0),  # plane z = 1, scaled
        torch.zeros(1, 3) + torch.tensor([[0.0, 0.0, 3.0]]),
        torch.tensor([[0.0, 0.0, -1.0]]),
        nears=torch.zeros(1, 1),
        fars=torch.full((1, 1), 10.0),
    )
    assert hit.item()
    torch.testing.assert_close(t[0, 0], torch.tensor(2.0), atol=2e-3, rtol=0)
