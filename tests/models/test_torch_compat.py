import pytest
import torch

from models import torch_compat


def test_torchvision_imports_through_compat():
    tv = torch_compat.import_torchvision()
    assert hasattr(tv, "__version__")
    # every op _meta_registrations touches exists afterwards (loaded natively or defined here)
    for name in torch_compat.TORCHVISION_OP_SCHEMAS:
        assert hasattr(torch.ops.torchvision, name), name


def test_torch_fidelity_imports_and_computes_kid():
    tf = torch_compat.import_torch_fidelity()
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    b = torch.randn(200, 4, generator=g, dtype=torch.float64)
    kw = dict(kid_subsets=10, kid_subset_size=100, kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=0, verbose=False)
    same = kid_features_to_metric(a, b, **kw)["kernel_inception_distance_mean"]
    shifted = kid_features_to_metric(a, b + 2.0, **kw)["kernel_inception_distance_mean"]
    assert tf.__version__
    assert abs(same) < 0.05 * shifted


def test_defining_schemas_is_idempotent():
    torch_compat.import_torchvision()
    assert torch_compat.define_torchvision_op_schemas() == []


def test_defined_ops_have_no_kernel():
    torch_compat.import_torchvision()
    if "nms" not in torch_compat.defined_op_names():
        pytest.skip("torchvision's compiled ops loaded natively; no schema had to be defined")
    with pytest.raises(NotImplementedError):
        torch.ops.torchvision.nms(torch.zeros(2, 4), torch.zeros(2), 0.5)
