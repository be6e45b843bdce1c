import numpy as np

from lsoftmax import core


def test_forward_without_labels_is_plain_matmul() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    np.testing.assert_allclose(core.forward(x, w, margin=4), x @ w.T, rtol=0, atol=1e-14)
