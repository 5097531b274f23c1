"""The planning math on plain arrays."""

import numpy as np
import pytest

from onnx_merge.math.criteria import merge_cost_kept
from onnx_merge.math import (BatchNorm, Compensation, compensate_consumer, importance, keep_count, merge_by_cosine,
                             merge_through_bn, select_kept)
from onnx_merge.math.batchnorm import bn_merge_terms
from onnx_merge.math.merge import relu_kernel_factor


@pytest.mark.parametrize("n,ratio,kept", [(100, 0.8, 20), (300, 0.7, 90), (10, 0.99, 1), (16, 0.5, 8), (64, 0.0, 64),
                                          (3, 0.5, 1), (100, 0.3, 70)])
def test_keep_count_is_floor_and_robust_to_float_error(n, ratio, kept):
    assert keep_count(n, ratio) == kept


def test_keep_count_rounds_up_to_multiple():
    assert keep_count(100, 0.5, round_to=8) == 56
    assert keep_count(10, 0.5, round_to=16) == 10


@pytest.mark.parametrize("n,block,step", [(256, 16, 16), (64, 16, 16), (32, 16, 16), (24, 16, 16), (16, 16, 16),
                                           (12, 16, 1), (40, 64, 4), (96, 8, 8), (64, 1, 1), (1000, 16, 16)])
def test_channel_step_is_the_block_where_the_layer_is_a_block_wide(n, block, step):
    """A count between two multiples of the block runs as slowly as the next one up; narrower
    layers round to a smaller step only where that costs at most an eighth of the layer."""
    from onnx_merge.math.criteria import channel_step

    assert channel_step(n, block) == step
    assert step == block or step == 1 or step - 1 <= n / 8


def test_auto_rounding_aligns_convs_only_and_a_rounded_count_stays():
    from onnx_merge.options import CompressOptions
    from onnx_merge.runtime import channel_block

    auto, exact = CompressOptions(), CompressOptions(round_to=1)
    block = channel_block("cpu", "Conv")
    assert channel_block("cpu", "MatMul") == 1 and channel_block("cuda", "Conv") == 8
    kept = auto.kept_channels(144, 0.3, "Conv")  # MobileNetV2's expansion width
    assert kept >= exact.kept_channels(144, 0.3, "Conv") == 100 and kept - 100 <= 144 / 8
    assert block <= 1 or kept % min(block, 16) == 0
    assert auto.kept_channels(144, 1 - kept / 144, "Conv") == kept  # the budget's ratio gives the same count
    assert auto.kept_channels(144, 0.3, "Gemm") == 100  # dense layers showed no step: exact
    assert CompressOptions(providers=("cuda",)).kept_channels(144, 0.3, "Gemm") == 104
    assert CompressOptions(round_to=8).kept_channels(144, 0.3, "Gemm") == 104
    assert auto.kept_channels(96, 0.5, "Conv", multiple=3) % 3 == 0  # conv groups always divide the count
    if block > 1:  # never a count that runs as slowly as the next block up
        assert all(auto.kept_channels(n, r, "Conv") % block == 0 or auto.kept_channels(n, r, "Conv") == n
                   for n in (block, 2 * block, 3 * block - 4, 96, 144) for r in (0.1, 0.3, 0.5, 0.7))
    if block > 1:  # a conv at least a block wide keeps a block: below it, it runs no faster
        assert auto.kept_channels(block, 0.5, "Conv") == block and exact.kept_channels(block, 0.5, "Conv") < block
        assert auto.kept_channels(block // 2, 0.5, "Conv") == exact.kept_channels(block // 2, 0.5, "Conv")


def test_keep_count_rejects_bad_ratio():
    with pytest.raises(ValueError):
        keep_count(10, 1.0)


def test_criteria_rank_rows():
    rows = np.array([[1.0, 0.0], [0.0, -3.0], [2.0, 2.0]])
    assert np.allclose(importance(rows, "l1-norm"), [1, 3, 4])
    assert np.allclose(importance(rows, "l2-norm"), [1, 3, np.sqrt(8)])
    # Geometric median: three rows near each other and one far away; the far one is most irreplaceable.
    gm = importance(np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]]), "l2-GM")
    assert np.argmax(gm) == 3
    assert list(select_kept(rows, 2, "l1-norm")) == [1, 2]
    with pytest.raises(ValueError):
        importance(rows, "nope")


def test_merge_cost_keeps_one_of_each_near_copy():
    # rows 0 and 1 are near-copies with the largest norms; row 2 is small and unlike them. A norm
    # ranking keeps both copies and loses row 2; merge-cost keeps one copy (the other merges
    # onto it almost for free) and row 2.
    rows = np.array([[3.0, 0.0, 0.1], [3.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    assert list(select_kept(rows, 2, "l1-norm")) == [0, 1]
    kept = select_kept(rows, 2, "merge-cost", threshold=0.1)
    assert 2 in kept and len(kept) == 2
    # below the threshold nothing merges, so the cost is the norm and the largest rows stay
    assert list(select_kept(rows, 2, "merge-cost", threshold=1.0)) == [0, 1]
    with pytest.raises(ValueError):
        importance(rows, "merge-cost")


def test_float16_rows_choose_and_merge_as_their_float32_copy():
    """float16 weights are multiplied in float32 (NumPy has no float16 BLAS): same choices, same partners."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 64)).astype(np.float16)
    rows[30:] = rows[:10] * np.float16(0.5) + np.float16(0.05) * rng.standard_normal((10, 64)).astype(np.float16)
    wide = rows.astype(np.float32)
    for criterion in ("merge-cost", "l2-GM"):
        assert list(select_kept(rows, 24, criterion)) == list(select_kept(wide, 24, criterion))
    kept = select_kept(rows, 24, "merge-cost")
    half, full = merge_by_cosine(rows, kept, 0.1, "projection"), merge_by_cosine(wide, kept, 0.1, "projection")
    assert np.array_equal(half.partner, full.partner) and np.allclose(half.scale, full.scale)


def _merge_cost_reference(rows, n_keep, threshold):
    """The same backward elimination, every cost recomputed from scratch."""
    sq = (rows ** 2).sum(axis=1)
    unit = rows / np.sqrt(np.where(sq > 0, sq, 1.0))[:, None]
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    gain = np.where(cos >= max(threshold, 0), sq[:, None] * np.maximum(cos, 0) ** 2, 0.0)

    def loss(alive):
        live = np.flatnonzero(alive)
        return sum(sq[i] - max([gain[i, k] for k in live if k != i] + [0.0]) for i in np.flatnonzero(~alive))

    alive = np.ones(len(rows), dtype=bool)
    while alive.sum() > n_keep:
        costs = []
        for j in np.flatnonzero(alive):
            trial = alive.copy()
            trial[j] = False
            costs.append((loss(trial), j))
        alive[min(costs)[1]] = False
    return np.flatnonzero(alive)


@pytest.mark.parametrize("seed", range(6))
def test_merge_cost_bookkeeping_matches_recomputing_every_cost(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 14))
    rows = rng.standard_normal((n, 4)) * rng.uniform(0.1, 3.0, (n, 1))
    rows[n // 2] = rows[0] * rng.uniform(0.5, 2.0) + 0.05 * rng.standard_normal(4)  # a near-copy: merges matter
    if n > 3:
        rows[n - 1] = 0.0  # a dead channel costs nothing to remove
    for n_keep in sorted({1, max(1, n // 2), n - 1, n}):
        for threshold in (-1.0, 0.1, 0.6):
            assert list(merge_cost_kept(rows, n_keep, threshold)) == list(_merge_cost_reference(rows, n_keep, threshold))


def test_exact_multiple_gives_exact_z():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4, 6))
    rows[3] = 2.5 * rows[1]
    for rule in ("exact", "projection", "kernel", "paper"):
        comp = merge_by_cosine(rows, np.array([0, 1, 2]), threshold=0.1, scale_rule=rule)
        z = comp.to_dense()
        assert z.shape == (3, 4)
        assert np.allclose(z[:, :3], np.eye(3))
        assert np.allclose(z[:, 3], [0, 2.5, 0]), rule


def test_threshold_prunes_dissimilar_rows_and_negative_cosine_never_merges():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.05]])
    comp = merge_by_cosine(rows, np.array([0, 1]), threshold=-1.0, scale_rule="exact")
    assert comp.partner[2] == 1  # the only positive-cosine partner
    comp = merge_by_cosine(rows, np.array([0, 1]), threshold=0.5, scale_rule="exact")
    assert comp.partner[2] == -1 and comp.scale[2] == 0


def test_scale_rules_order():
    rows = np.array([[1.0, 0.0], [0.6, 0.8]])  # cos 0.6
    scales = {r: merge_by_cosine(rows, np.array([0]), 0.1, r).scale[1] for r in ("exact", "projection", "kernel")}
    assert scales["projection"] == pytest.approx(0.6)
    assert scales["exact"] == pytest.approx(1.0)
    assert scales["projection"] < scales["kernel"] < scales["exact"]
    assert relu_kernel_factor(np.array([1.0, 0.0]))[0] == pytest.approx(1.0)
    assert relu_kernel_factor(np.array([0.0]))[0] == pytest.approx(1 / np.pi)


def test_compensate_consumer_equals_dense_product():
    rng = np.random.default_rng(1)
    n, block, m, k = 6, 3, 4, 5
    view = rng.standard_normal((n, block, m, k))
    comp = Compensation.prune(n, np.array([0, 2, 5]))
    comp.partner[[1, 3]] = [1, 1]
    comp.scale[[1, 3]] = [0.5, 2.0]
    comp.dense = rng.standard_normal((3, 3)) * 0.1
    comp.offset = rng.standard_normal(n)
    out, bias = compensate_consumer(view, comp)
    z = comp.to_dense()
    expected = np.einsum("pn,nbmk->pbmk", z, view)
    assert np.allclose(out, expected)
    assert np.allclose(bias, np.einsum("n,nbmk->m", comp.offset, view))


@pytest.mark.parametrize("layout", ["gemm-transB", "matmul", "conv", "interleaved"])
def test_compensate_along_equals_the_channel_first_view(layout):
    """Weights compensated in their own layout equal the (N, B, M, K) view's result, laid back."""
    from onnx_merge.math.compensation import compensate_along

    rng = np.random.default_rng(3)
    n, block, m = 6, 4, 5
    comp = Compensation.prune(n, np.array([1, 2, 4]))
    comp.partner[[0, 5]] = [2, 0]
    comp.scale[[0, 5]] = [0.5, -1.5]
    comp.dense = rng.standard_normal((3, 3))
    comp.offset = rng.standard_normal(n)
    if layout == "conv":  # (M, N, kh, kw): channels on axis 1, taps after
        weight, axis, out_axis, block = rng.standard_normal((m, n, 3, 3)), 1, 0, 1
        view = weight.transpose(1, 0, 2, 3).reshape(n, 1, m, 9)
    elif layout == "matmul":  # (N*B, M)
        weight, axis, out_axis = rng.standard_normal((n * block, m)), 0, 1
        view = weight.reshape(n, block, m, 1)
    else:  # Gemm transB (M, N*B); interleaved features are ordered (block, channel)
        weight, axis, out_axis = rng.standard_normal((m, n * block)), 1, 0
        cols = weight.T.reshape(block, n, m).swapaxes(0, 1) if layout == "interleaved" else weight.T.reshape(n, block, m)
        view = cols[..., None]
    out, bias = compensate_along(weight, axis, out_axis, comp, block, layout == "interleaved")
    expected, expected_bias = compensate_consumer(view, comp)
    if layout == "conv":
        laid = expected.reshape(3, m, 3, 3).transpose(1, 0, 2, 3)
    elif layout == "matmul":
        laid = expected.reshape(3 * block, m)
    elif layout == "interleaved":
        laid = expected[..., 0].swapaxes(0, 1).reshape(3 * block, m).T
    else:
        laid = expected[..., 0].reshape(3 * block, m).T
    assert out.flags.c_contiguous and np.allclose(out, laid)
    assert np.allclose(bias, expected_bias)


def test_batchnorm_fold_matches_bn():
    rng = np.random.default_rng(2)
    bn = BatchNorm(rng.uniform(0.5, 2, 3), rng.standard_normal(3), rng.standard_normal(3), rng.uniform(0.5, 2, 3))
    w, b, x = rng.standard_normal((3, 4)), rng.standard_normal(3), rng.standard_normal(4)
    fw, fb = bn.fold(w, b)
    z = w @ x + b
    assert np.allclose(fw @ x + fb, bn.gamma * (z - bn.mean) / bn.sigma + bn.beta)


def test_bn_identity_exact_for_planted_duplicate():
    """METHOD.md 3b: with F_n = s F_m and BN statistics chosen so that r = 0, BN_n = S BN_m."""
    rng = np.random.default_rng(3)
    f_m = rng.standard_normal(9)
    s = 1.7
    gamma, beta = np.array([1.2, 0.8]), np.array([0.3, 0.0])
    mean, var = np.array([0.4, 0.0]), np.array([0.9, 2.5])
    bn = BatchNorm(gamma, beta, mean, var)
    # choose channel 1's beta and mean so that r = 0 with the exact S
    big_s, _ = bn_merge_terms(bn, 1, np.array([0]), np.array([s]), "exact")
    bn.beta[1] = big_s[0] * beta[0]
    bn.mean[1] = s * mean[0]
    big_s, r = bn_merge_terms(bn, 1, np.array([0]), np.array([s]), "exact")
    assert abs(r[0]) < 1e-12
    x = rng.standard_normal((9, 50))
    z_m, z_n = f_m @ x, s * f_m @ x
    bn_m = gamma[0] * (z_m - bn.mean[0]) / bn.sigma[0] + bn.beta[0]
    bn_n = gamma[1] * (z_n - bn.mean[1]) / bn.sigma[1] + bn.beta[1]
    assert np.allclose(bn_n, big_s[0] * bn_m)
    # the authors' released formula gets this wrong
    paper_s, _ = bn_merge_terms(bn, 1, np.array([0]), np.array([s]), "paper")
    assert not np.isclose(paper_s[0], big_s[0])
    comp = merge_through_bn(np.stack([f_m, s * f_m]), bn, np.array([0]), 0.1, 0.85, "exact")
    assert comp.partner[1] == 0 and comp.scale[1] == pytest.approx(big_s[0])


def test_expected_relu_matches_sampling_and_offset_accounts_for_partner():
    from onnx_merge.math.batchnorm import expected_relu
    from onnx_merge.math.planner import bn_mean_offset

    rng = np.random.default_rng(4)
    z = rng.normal(0.3, 1.5, 400_000)
    assert expected_relu(np.array([0.3]), np.array([1.5]))[0] == pytest.approx(np.maximum(z, 0).mean(), rel=1e-2)
    bn = BatchNorm(np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, -1.0]), np.zeros(3), np.ones(3))
    comp = Compensation.prune(3, np.array([0]))
    comp.partner[1], comp.scale[1] = 0, 2.0
    offset = bn_mean_offset(bn, comp)
    e = expected_relu(bn.beta, bn.gamma)
    assert offset[0] == 0 and offset[1] == pytest.approx(e[1] - 2.0 * e[0]) and offset[2] == pytest.approx(e[2])



@pytest.mark.parametrize("criterion", ["l1-norm", "l2-norm", "l2-path"])
def test_ranking_with_a_bias_scores_the_appended_rows_without_building_them(criterion):
    from onnx_merge.math.criteria import importance
    from onnx_merge.math.planner import PlanOptions, ProducerArrays, rank_kept

    rng = np.random.default_rng(4)
    weight, bias, norms = rng.standard_normal((40, 7)), rng.standard_normal(40) * 3, rng.uniform(0.5, 2, 40)
    arrays = ProducerArrays(weight=weight, bias=bias, consumer_norms=norms, dense=True)
    kept = rank_kept(arrays, 15, PlanOptions(method="prune", criterion=criterion))
    rows = np.hstack([weight, bias[:, None]])
    expected = np.sort(np.argsort(-importance(rows, criterion, norms), kind="stable")[:15])
    assert kept.tolist() == expected.tolist()


def test_merge_with_a_bias_equals_merging_the_appended_rows():
    rng = np.random.default_rng(5)
    weight, bias = rng.standard_normal((12, 6)), rng.standard_normal(12)
    weight[7], bias[7] = 2 * weight[2], 2 * bias[2]  # an exact multiple merges onto its row
    kept = np.array([0, 2, 3, 5, 9])
    whole = merge_by_cosine(np.hstack([weight, bias[:, None]]), kept, 0.1, "projection")
    parts = merge_by_cosine(weight, kept, 0.1, "projection", bias)
    assert np.array_equal(whole.partner, parts.partner) and np.allclose(whole.scale, parts.scale)
    assert parts.partner[7] == 1 and parts.scale[7] == pytest.approx(2.0)


def test_the_deployment_cpus_block_can_be_named(monkeypatch):
    """A model compressed here may run on another CPU: $ONNX_MERGE_CPU_BLOCK names its block."""
    from onnx_merge.errors import UsageError
    from onnx_merge.runtime import CPU_BLOCK_VARIABLE, channel_block

    monkeypatch.setenv(CPU_BLOCK_VARIABLE, "8")
    assert channel_block("cpu", "Conv") == 8 and channel_block("cpu", "Gemm") == 1
    monkeypatch.setenv(CPU_BLOCK_VARIABLE, "wide")
    with pytest.raises(UsageError, match=CPU_BLOCK_VARIABLE):
        channel_block("cpu", "Conv")


def test_scatter_add_sums_repeated_indices_as_add_at_does():
    from onnx_merge.math.compensation import scatter_add

    rng = np.random.default_rng(3)
    index = np.array([4, 1, 4, 0, 4, 1, 7])
    values = rng.standard_normal((len(index), 3, 2))
    want = rng.standard_normal((8, 3, 2))
    got = want.copy()
    np.add.at(want, index, values)
    scatter_add(got, index, values)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    view = np.zeros((3, 8)).T  # a strided view (a moved axis), written through
    scatter_add(view, index, np.ones((len(index), 3)))
    assert view[4].tolist() == [3, 3, 3] and view.base.sum() == 3 * len(index)
    scatter_add(got, index[:0], values[:0])  # nothing to add
