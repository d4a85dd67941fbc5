import pytest
import torch

from cocoinr_nerfstudio.model_components.mask_split import split_mask


@pytest.mark.parametrize("shape", [(7,), (3, 5), (0,), (1,)])
def test_the_indices_gather_what_boolean_indexing_gathers_in_order(shape):
    torch.manual_seed(0)
    mask = torch.rand(shape) > 0.4
    values = torch.randn(*shape, 2)
    true_side, false_side = split_mask(mask)
    assert true_side.dtype == torch.long and false_side.dtype == torch.long
    flat = values.reshape(-1, 2)
    torch.testing.assert_close(flat[true_side], values[mask], rtol=0, atol=0)
    torch.testing.assert_close(flat[false_side], values[~mask], rtol=0, atol=0)


def test_all_true_all_false_and_an_exact_example():
    ones, none = split_mask(torch.ones(4, dtype=torch.bool))
    assert ones.tolist() == [0, 1, 2, 3] and none.tolist() == []
    none, zeros = split_mask(torch.zeros(3, dtype=torch.bool))
    assert none.tolist() == [] and zeros.tolist() == [0, 1, 2]
    true_side, false_side = split_mask(torch.tensor([[False, True, True], [False, False, True]]))
    assert true_side.tolist() == [1, 2, 5] and false_side.tolist() == [0, 3, 4]
