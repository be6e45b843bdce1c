"""Where the core's loops run: the caller's pool, the core's persistent pool, or serially.

The core never starts threads per call and never aborts when threads cannot be had (issue 11).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from lsoftmax import core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(n: int = 4096, c: int = 7, d: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((c, d))
    y = rng.integers(0, c, n)
    g = rng.standard_normal((n, c))
    return x, w, y, g


def _run_python(code: str, *, env: dict[str, str] | None = None, limits: str = "") -> tuple:
    """Runs `code` in a fresh interpreter (optionally under shell ulimits)."""
    full_env = {**os.environ, **(env or {})}
    script = f"{limits} exec {sys.executable} -c {_shell_quote(textwrap.dedent(code))}"
    proc = subprocess.run(
        ["bash", "-c", script], env=full_env, capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    return proc.returncode, proc.stdout, proc.stderr


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# The repro: a 900 MB default stack under a 3 GB address-space limit, so no thread can
# start. The old loop called std::terminate (exit code 134); now the work runs serially.
_NO_THREADS = "ulimit -v 3000000 && ulimit -s 900000 &&"


def test_numpy_path_runs_serially_when_threads_cannot_start() -> None:
    code = """
        import numpy as np
        from lsoftmax import core
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((4096, 64)), rng.standard_normal((7, 64))
        y, g = rng.integers(0, 7, 4096), rng.standard_normal((4096, 7))
        out = core.forward(x, w, y, margin=4, lam=0.5)
        gx, gw = core.backward(g, x, w, y, margin=4, lam=0.5)
        print(repr(float(np.abs(out).sum())), repr(float(np.abs(gx).sum() + np.abs(gw).sum())))
    """
    rc, out, err = _run_python(code, env={"LSOFTMAX_NUM_THREADS": "4"}, limits=_NO_THREADS)
    assert rc == 0, f"exit code {rc} (134 is the old abort); stderr:\n{err}"
    # Same draws as the child's; results do not depend on the thread count, so bit-equal.
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4096, 64)), rng.standard_normal((7, 64))
    y, g = rng.integers(0, 7, 4096), rng.standard_normal((4096, 7))
    before = core.get_num_threads()
    try:
        core.set_num_threads(1)
        ref = core.forward(x, w, y, margin=4, lam=0.5)
        gx, gw = core.backward(g, x, w, y, margin=4, lam=0.5)
    finally:
        core.set_num_threads(before)
    got = [float(v) for v in out.split()]
    assert got == [float(np.abs(ref).sum()), float(np.abs(gx).sum() + np.abs(gw).sum())]


def test_ort_kernel_survives_when_threads_cannot_start() -> None:
    pytest.importorskip("onnxruntime")
    code = """
        import numpy as np
        import onnx
        from onnx import TensorProto, helper
        from lsoftmax import ort as lort
        node = helper.make_node("LSoftmaxLinear", ["X", "W", "L"], ["Y"], domain="ai.lsoftmax",
                                margin=4, **{"lambda": 0.5})
        graph = helper.make_graph(
            [node], "g",
            [helper.make_tensor_value_info("X", TensorProto.DOUBLE, [None, 64]),
             helper.make_tensor_value_info("W", TensorProto.DOUBLE, [7, 64]),
             helper.make_tensor_value_info("L", TensorProto.INT64, [None])],
            [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, [None, 7])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("ai.lsoftmax", 1)])
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((4096, 64)), rng.standard_normal((7, 64))
        y = rng.integers(0, 7, 4096)
        outs = []
        for threads in (1, 2):
            sess = lort.session(model.SerializeToString(), intra_op_num_threads=threads)
            outs.append(sess.run(None, {"X": x, "W": w, "L": y})[0])
        assert np.array_equal(outs[0], outs[1])
        print("ok")
    """
    rc, out, err = _run_python(code, env={"LSOFTMAX_NUM_THREADS": "4"}, limits=_NO_THREADS)
    if rc != 0 and "Failed to create" in err and "thread" in err.lower():
        # ORT's own pool creation can fail under the limit: that is an error ORT reports.
        assert rc != 134, err
        pytest.skip("onnxruntime itself cannot create its intra-op pool under this limit")
    assert rc == 0, f"exit code {rc} (134 is the old abort); stderr:\n{err}"
    assert out.strip().endswith("ok")


def test_pool_threads_persist_across_calls() -> None:
    """The numpy path's pool starts once: repeated calls add no threads, and resizing reuses."""
    code = """
        import os
        import numpy as np
        from lsoftmax import core
        def count():
            return len(os.listdir("/proc/self/task"))
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((4096, 64)), rng.standard_normal((7, 64))
        y = rng.integers(0, 7, 4096)
        core.set_num_threads(3)
        base = count()
        core.forward(x, w, y, margin=4, lam=0.5)
        first = count()
        for _ in range(20):
            core.forward(x, w, y, margin=4, lam=0.5)
        print(base, first, count())
    """
    rc, out, err = _run_python(code, env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert rc == 0, err
    base, first, after = (int(v) for v in out.split())
    assert first == base + 2  # two helpers; the calling thread is the third
    assert after == first


def test_concurrent_callers_get_identical_results() -> None:
    """Several Python threads (GIL released in the core) share the pool or run serially."""
    x, w, y, g = _case(seed=3)
    before = core.get_num_threads()
    core.set_num_threads(2)
    try:
        ref = core.forward(x, w, y, margin=4, lam=0.5)
        ref_g = core.backward(g, x, w, y, margin=4, lam=0.5)
        results: list = []
        errors: list = []

        def worker() -> None:
            try:
                for _ in range(10):
                    results.append(
                        (
                            core.forward(x, w, y, margin=4, lam=0.5),
                            core.backward(g, x, w, y, margin=4, lam=0.5),
                        )
                    )
            except Exception as e:  # surfaced below
                errors.append(e)

        ts = [threading.Thread(target=worker) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in ts), "a caller hung"
        assert not errors
        assert len(results) == 40
        for out, (gx, gw) in results:
            np.testing.assert_array_equal(out, ref)
            np.testing.assert_array_equal(gx, ref_g[0])
            np.testing.assert_array_equal(gw, ref_g[1])
    finally:
        core.set_num_threads(before)


def test_forked_child_restarts_the_pool() -> None:
    """A child forked after the pool started (DataLoader workers) must not wait for threads it
    does not have."""
    code = """
        import os
        import numpy as np
        from lsoftmax import core
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((4096, 64)), rng.standard_normal((7, 64))
        y = rng.integers(0, 7, 4096)
        core.set_num_threads(2)
        ref = core.forward(x, w, y, margin=4, lam=0.5)
        pid = os.fork()
        if pid == 0:
            ok = np.array_equal(core.forward(x, w, y, margin=4, lam=0.5), ref)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """
    rc, out, err = _run_python(code)
    assert rc == 0, err
    assert out.strip() == "0"


def test_torch_extension_is_built_and_used() -> None:
    """The build (with torch installed, as scripts/setup.sh and CI do) makes _torch_ops.so, and
    the eager CPU layer and the custom ops' CPU kernels go through it."""
    import torch

    from lsoftmax.torch import _kernels, ops
    from lsoftmax.torch.functional import lsoftmax_logits

    assert _kernels.TORCH_OPS, "lsoftmax/_torch_ops.so was not built or did not load"
    assert ops._CPP_MARGIN_LINEAR is not None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (64,), generator=gen)
    eager = lsoftmax_logits(x, w, y, 4, 0.5)
    assert "MarginLinear" in eager.grad_fn.name()  # the C++ autograd node
    fallback = ops._EagerMarginLinear.apply(x, w, y, 4, 0.5)
    op = torch.ops.lsoftmax.linear(x, w, y, 4, 0.5)
    torch.testing.assert_close(eager, fallback, rtol=0, atol=0)
    torch.testing.assert_close(eager, op, rtol=0, atol=0)
    g = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    grads = [torch.autograd.grad(t, (x, w), g) for t in (eager, fallback, op)]
    # With 5 classes and 16 features the C++ node folds the margin into its GEMMs (the other
    # paths add it after them): equal to rounding. The custom op's backward also recomputes the
    # norms and cosines (summed in another order).
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # With more classes than N D / (N + D) it does not fold: the same forward stats and the
    # same kernels as the fallback, bit-equal.
    w_wide = torch.randn(300, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    y_wide = torch.randint(0, 300, (64,), generator=gen)
    g_wide = torch.randn(64, 300, generator=gen, dtype=torch.float64)
    wide = [
        torch.autograd.grad(f(x, w_wide, y_wide, 4, 0.5), (x, w_wide), g_wide)
        for f in (lsoftmax_logits, ops._EagerMarginLinear.apply)
    ]
    for a, b in zip(*wide, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_pool_runs_core_loops_on_several_threads() -> None:
    """torch's pool really splits the core's loops: an extension compiled without torch's OpenMP
    flags runs at::parallel_for on the calling thread alone, with no error (the fused loss's
    kernels and the layer's margin passes ran serially at every thread count that way)."""
    import torch

    from lsoftmax.torch import _kernels

    assert _kernels.TORCH_OPS, "lsoftmax/_torch_ops.so was not built or did not load"
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.ops.lsoftmax_cpu.pool_threads(64) == threads
        assert torch.ops.lsoftmax_cpu.pool_threads(1) == 1  # one item: one range
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match=r"n must be in \[1, 4096\], got 0"):
        torch.ops.lsoftmax_cpu.pool_threads(0)


def test_torch_extension_reports_bad_labels_like_the_core() -> None:
    import torch

    from lsoftmax.torch.functional import lsoftmax_logits

    x, w = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"labels\[1\] = 5 is out of range \[0, 2\)"):
        lsoftmax_logits(x, w, torch.tensor([0, 5, 1, 0]), 4, 0.5)
    with pytest.raises(ValueError, match=r"lambda must be >= 0"):
        torch.ops.lsoftmax_cpu.margin_linear(x, w, torch.tensor([0, 1, 1, 0]), 4, -1.0)


def test_torch_calls_run_on_torch_pool_with_identical_results() -> None:
    """The fused loss and the L-GM loss called from torch run the core's loops on torch's
    intra-op pool: the core's own pool never starts (its threads would show in
    /proc/self/task), and the results at torch.set_num_threads(1) and (2) are bit-identical."""
    code = """
        import os
        import torch
        from lsoftmax import core
        from lsoftmax.torch import LGMLoss
        from lsoftmax.torch.functional import margin_cross_entropy
        def count():
            return len(os.listdir("/proc/self/task"))
        g = torch.Generator().manual_seed(0)
        # 512 rows: well past the core's grain, so every loop would be parallel.
        x = torch.randn(512, 32, generator=g, dtype=torch.float64)
        w = torch.randn(3000, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3000, (512,), generator=g)
        lgm = LGMLoss(40, 32, alpha=0.5).double()
        yl = y % 40
        def step():
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            loss = margin_cross_entropy(xr, wr, y, 4, chunk_size=700, lam=0.5)
            loss.backward()
            lgm.zero_grad()
            xl = x.clone().requires_grad_()
            lloss, _ = lgm(xl, yl)
            lloss.backward()
            return [loss, xr.grad, wr.grad, lloss, xl.grad, lgm.means.grad, lgm.log_var.grad]
        out = {}
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            torch.mm(x, w.t()).sum()  # torch's own pool is up at this size before counting
            before = count()
            out[threads] = step()
            assert count() == before, (threads, before, count())
        same = all(torch.equal(a, b) for a, b in zip(out[1], out[2]))
        base = count()
        xs = torch.cat([x] * 8).numpy()  # 4096 rows: the same loop's grain in the numpy path
        core.forward(xs, w[:7].numpy(), torch.cat([y] * 8).numpy() % 7, margin=4, lam=0.5)
        print(same, count() - base)
    """
    rc, out, err = _run_python(code, env={"LSOFTMAX_NUM_THREADS": "4"})
    assert rc == 0, err
    same, started = out.split()
    assert same == "True"
    # The control: the numpy path does start the core's pool (3 helpers), so the counts above
    # would have seen it.
    assert started == "3"
