"""Merge methods against hand computations on small tensors (docs/merging.md)."""
from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from lineage.errors import LineageError
from lineage.merge import methods, rng
from lineage.merge.methods import METHODS, get_method, merge_method
from lineage.merge.parameters import Count, Share


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def typical_count(method_name: str) -> int:
    """3 models for methods that take any number, else the number the method takes."""
    method = get_method(method_name)
    return method.min_models if method.max_models is not None else max(3, method.min_models)


def sample_inputs(method_name: str, shape=(3, 4, 2, 2), count: int | None = None) -> list[torch.Tensor]:
    """Close-but-different fp32 models for `method_name` (the base first when it needs one)."""
    count = count or typical_count(method_name)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(count - 1)]


def call(method_name: str, *models: torch.Tensor, **params) -> torch.Tensor:
    method = get_method(method_name)
    if method.random:
        params.setdefault("seed", 1234)
    return method.fn(*models, **params)


# ---------------------------------------------------------------------------------------------
# Common contract


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_returns_fp32_of_the_input_shape_and_leaves_inputs_alone(name):
    inputs = sample_inputs(name)
    copies = [x.clone() for x in inputs]
    out = call(name, *inputs)
    assert out.dtype == torch.float32 and out.shape == inputs[0].shape
    assert torch.isfinite(out).all()
    for x, original in zip(inputs, copies):
        assert torch.equal(x, original)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_documents_each_of_its_parameters(name):
    method = get_method(name)
    assert method.doc
    for parameter in method.defaults:
        assert parameter in method.doc, (name, parameter)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_merging_identical_models_gives_that_model(name):
    x = sample_inputs(name)[0]
    assert torch.allclose(call(name, *[x] * typical_count(name)), x, atol=1e-6)


@pytest.mark.parametrize("name", [n for n, m in sorted(METHODS.items()) if m.elementwise])
def test_elementwise_methods_give_the_same_result_on_pieces(name):
    """Pieces given the whole tensor's statistics (if the method has any) give the whole's result."""
    method = get_method(name)
    inputs = sample_inputs(name, shape=(5, 7))
    whole = call(name, *inputs)
    params = {}
    if method.statistics is not None:
        params["statistics"] = method.statistics(inputs, method.defaults)
    pieces = torch.cat([call(name, *(x.reshape(-1)[i:i + 4] for x in inputs), **params) for i in range(0, 35, 4)])
    assert torch.allclose(whole.reshape(-1), pieces, atol=1e-6)


@pytest.mark.parametrize("name", [n for n, m in sorted(METHODS.items()) if m.statistics is not None])
def test_statistics_from_the_stored_flat_tensors_equal_those_of_the_method(name):
    """The engine gives a method's statistics each input's whole flat tensor as stored (fp16 views of
    the mapped file); they must be exactly what the method computes itself on fp32 tensors, and the
    method given them must return exactly its own result."""
    method = get_method(name)
    stored = [x.half() for x in sample_inputs(name, shape=(600, 1000))]  # above the old sample size
    inputs = [x.float() for x in stored]
    from_stored = method.statistics([x.reshape(-1) for x in stored], method.defaults)
    assert from_stored == method.statistics(inputs, method.defaults)
    assert torch.equal(call(name, *inputs, statistics=from_stored), call(name, *inputs))
    assert all(torch.equal(x.float(), y) for x, y in zip(stored, inputs))  # inputs untouched


@pytest.mark.parametrize("name", ["ties", "train_difference", "task_arithmetic", "breadcrumbs", "geometric_median"])
def test_slicing_inside_a_method_does_not_change_its_result(monkeypatch, name):
    inputs = sample_inputs(name, shape=(10, 13))
    whole = call(name, *inputs)
    monkeypatch.setattr(methods, "SLICE_ELEMENTS", 7)  # 130 entries in 19 uneven slices
    assert torch.allclose(call(name, *inputs), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, count, message", [
    ("weighted_sum", 3, "takes 2 models, got 3"),
    ("add_difference", 2, "takes 3 models, got 2"),
    ("ties", 1, "takes at least 2 models (the base first), got 1"),
    ("model_stock", 2, "takes at least 3 models (the base first), got 2"),
    ("geometric_median", 2, "takes at least 3 models, got 2"),
])
def test_model_count_errors_name_the_method_and_the_counts(name, count, message):
    with pytest.raises(LineageError, match=re.escape(f"merge method {name!r} {message}")):
        get_method(name).check_model_count(count)
    get_method(name).check_model_count(get_method(name).min_models)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(LineageError, match="unknown merge method 'tie'; known: .*ties"):
        get_method("tie")


def test_a_user_registers_a_method_from_a_script(monkeypatch):
    monkeypatch.setattr(methods, "METHODS", dict(METHODS))

    @merge_method("midpoint_plus", elementwise=True)
    def midpoint_plus(a, b, *, offset: float = 0.0):
        """The midpoint of A and B plus `offset`."""
        return (a + b) / 2 + offset

    registered = methods.get_method("midpoint_plus")
    assert registered.defaults == {"offset": 0.0} and registered.elementwise and not registered.random
    assert (registered.min_models, registered.max_models, registered.needs_base) == (2, 2, False)
    assert registered.doc == "The midpoint of A and B plus `offset`."
    assert torch.equal(registered.fn(t(1.0, 2.0), t(3.0, 6.0), offset=1.0), t(3.0, 5.0))
    with pytest.raises(LineageError, match="takes 2 models"):
        registered.check_model_count(3)
    with pytest.raises(LineageError, match="parameter 'offset' must be a finite number, got inf"):
        midpoint_plus(t(1.0), t(2.0), offset=math.inf)  # a plain float parameter is any finite number


def test_a_signature_declares_base_model_count_randomness_and_parameter_types(monkeypatch):
    monkeypatch.setattr(methods, "METHODS", dict(METHODS))

    @merge_method("sparse_sum")
    def sparse_sum(base, *models, share: Share = 0.5, rounds: Count = 2, seed: int):
        """Keeps a random `share` of each delta, `rounds` times."""
        return base

    @merge_method("three_way")
    def three_way(a, b, c, *, weight: float = 1.0):
        """`weight` of the third."""
        return a

    declared = methods.get_method("sparse_sum")
    assert (declared.needs_base, declared.min_models, declared.max_models, declared.random) == (True, 2, None, True)
    assert declared.defaults == {"share": 0.5, "rounds": 2}  # seed is the engine's, not the user's
    fixed = methods.get_method("three_way")
    assert (fixed.needs_base, fixed.min_models, fixed.max_models, fixed.random) == (False, 3, 3, False)
    with pytest.raises(LineageError, match="parameter 'share' must be in \\[0, 1\\], got 2"):
        declared.check_params({"share": 2}, 3)
    with pytest.raises(LineageError, match="parameter 'rounds' must be a whole number, got 1.5"):
        declared.check_params({"rounds": 1.5}, 3)
    with pytest.raises(LineageError, match="takes at least 2 models \\(the base first\\), got 1"):
        sparse_sum(t(1.0), seed=0)


@pytest.mark.parametrize("source, message", [
    ("def f(a, b, *, x=1.0): ...", "parameter 'x' needs a type"),
    ("def f(a, b, *, x: float): ...", "parameter 'x' needs a default"),
    ("def f(a, b, *, x: Share = 1.5): ...", "the default of 'x' must be in \\[0, 1\\], got 1.5"),
    ("def f(a, b, **extra): ...", "\\*\\*kwargs is not allowed"),
    ("def f(*, x: float = 1.0): ...", "takes no models"),
    ("def f(a, b, *, statistics=None): ...", "a `statistics` function and a `statistics` keyword parameter"),
])
def test_a_declaration_mistake_is_a_type_error_naming_the_method(monkeypatch, source, message):
    monkeypatch.setattr(methods, "METHODS", dict(METHODS))
    namespace = {"Share": Share}
    exec(source, namespace)
    with pytest.raises(TypeError, match=f"merge method 'bad': {message}"):
        merge_method("bad")(namespace["f"])
    with pytest.raises(TypeError, match="min_models is for methods taking \\*models"):
        merge_method("bad", min_models=3)(lambda a, b: a)
    with pytest.raises(TypeError, match="a `stored_loop` is for elementwise methods with `statistics`"):
        merge_method("bad", elementwise=True, stored_loop=lambda out, inputs, params: [])(lambda a, b: a)


def test_random_methods_are_marked_and_their_seed_is_not_a_parameter():
    assert {n for n, m in METHODS.items() if m.random} == {"dare_linear", "dare_ties", "della"}
    for name in ("dare_linear", "dare_ties", "della"):
        assert "seed" not in get_method(name).defaults
        assert inspect.signature(get_method(name).fn).parameters["seed"].kind is inspect.Parameter.KEYWORD_ONLY


# ---------------------------------------------------------------------------------------------
# Two models


def test_weighted_sum_alpha_is_the_weight_of_b():
    assert torch.equal(methods.weighted_sum(t(1.0, 2.0), t(3.0, 6.0), alpha=0.25), t(1.5, 3.0))


def test_add_difference():
    assert torch.allclose(methods.add_difference(t(1.0, 1.0), t(3.0, 0.0), t(2.0, 2.0), alpha=0.5), t(1.5, 0.0))


def test_train_difference_worked_by_hand():
    a, b, c = t(0.0, 1.0, 2.0), t(1.0, 1.0, 4.0), t(0.0, 1.0, 0.0)
    # entry 0: B−C = 1, |B−A| = 1, |B−C| = 1 -> share 1/2 -> 0 + 1.8·0.5·1·1/2 = 0.45
    # entry 1: B−C = 0 and |B−A| = 0 -> unchanged
    # entry 2: B−C = 4, |B−A| = 2, |B−C| = 4 -> share 1/3 -> 2 + 1.8·0.5·4/3 = 3.2
    assert torch.allclose(methods.train_difference(a, b, c, alpha=0.5), t(0.45, 1.0, 3.2))


def test_slerp_endpoints_are_the_models():
    a, b = t(1.0, 2.0, -1.0), t(-2.0, 0.5, 3.0)
    assert torch.equal(methods.slerp(a, b, alpha=0.0), a)
    assert torch.allclose(methods.slerp(a, b, alpha=1.0), b, atol=1e-6)


def test_slerp_at_a_known_angle_stays_on_the_circle():
    # A and B at 90°: halfway is at 45° with the same radius 2, not the chord's midpoint (1, 1).
    assert torch.allclose(methods.slerp(t(2.0, 0.0), t(0.0, 2.0), alpha=0.5), t(math.sqrt(2), math.sqrt(2)))
    # A third of the way from A to B at 120°: the point at 40° on the unit circle.
    a, b = t(1.0, 0.0), t(math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3))
    expected = t(math.cos(2 * math.pi / 9), math.sin(2 * math.pi / 9))
    assert torch.allclose(methods.slerp(a, b, alpha=1 / 3), expected, atol=1e-6)


def test_slerp_falls_back_to_the_weighted_sum_for_parallel_or_zero_tensors():
    a = t(1.0, 2.0, 3.0)
    assert torch.equal(methods.slerp(a, 2 * a, alpha=0.5), 1.5 * a)  # cos = 1
    assert torch.equal(methods.slerp(a, -a, alpha=0.25), 0.5 * a)  # cos = −1
    assert torch.equal(methods.slerp(torch.zeros(3), a, alpha=0.5), 0.5 * a)  # no angle


# ---------------------------------------------------------------------------------------------
# Any number of models


def test_linear_normalises_the_weights():
    models = [t(0.0, 4.0), t(4.0, 0.0), t(8.0, 8.0)]
    assert torch.allclose(methods.linear(*models, weights=[1, 1, 2]), t(5.0, 5.0))
    assert torch.allclose(methods.linear(*models, weights=[0.25, 0.25, 0.5]), t(5.0, 5.0))
    assert torch.allclose(methods.linear(*models), t(4.0, 4.0))
    assert torch.allclose(methods.linear(models[0], models[1], weights=[0.75, 0.25]),
                          methods.weighted_sum(models[0], models[1], alpha=0.25))


def test_linear_refuses_bad_weights():
    with pytest.raises(LineageError, match="'linear': parameter 'weights' takes one number per model \\(3\\), got 2"):
        methods.linear(t(1.0), t(2.0), t(3.0), weights=[1, 2])
    with pytest.raises(LineageError, match="'linear': the weights sum to 0"):
        methods.linear(t(1.0), t(2.0), weights=[1, -1])
    with pytest.raises(LineageError, match="'linear': parameter 'weights' must be finite numbers, got \\[1, nan\\]"):
        methods.linear(t(1.0), t(2.0), weights=[1, math.nan])


def test_geometric_median_of_points_with_known_medians():
    # Collinear points: the median is the middle one, whatever the outlier's distance.
    assert torch.allclose(methods.geometric_median(t(0.0), t(1.0), t(10.0)), t(1.0), atol=1e-5)
    # An equilateral triangle: the centroid.
    s3 = math.sqrt(3)
    assert torch.allclose(methods.geometric_median(t(0.0, 0.0), t(2.0, 0.0), t(1.0, s3)), t(1.0, s3 / 3), atol=1e-5)
    # A triangle with an angle of at least 120° at the origin: the median is that vertex.
    assert torch.allclose(methods.geometric_median(t(0.0, 0.0), t(1.0, 0.0), t(-1.0, 0.1)), t(0.0, 0.0), atol=1e-5)
    # Four square corners plus the centre, with the centre weighted down: still the centre (symmetry).
    corners = [t(0.0, 0.0), t(2.0, 0.0), t(0.0, 2.0), t(2.0, 2.0), t(1.0, 1.0)]
    assert torch.allclose(methods.geometric_median(*corners, weights=[1, 1, 1, 1, 0.1]), t(1.0, 1.0), atol=1e-5)


def test_geometric_median_that_is_a_model_is_that_model_exactly_and_at_once(monkeypatch):
    """Where a model is the median (two of three equal, or a vertex with an angle of 120° or more), it is
    returned as it is, without iterating; where none is, the iteration runs as before."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(500, generator=g), torch.randn(500, generator=g)
    steps = []
    linear = methods.linear
    monkeypatch.setattr(methods, "linear", lambda *m, weights: (steps.append(weights), linear(*m, weights=weights))[1])
    assert torch.equal(methods.geometric_median(a, b, a.clone()), a)
    assert torch.equal(methods.geometric_median(t(0.0, 0.0), t(1.0, 0.0), t(-1.0, 0.1)), t(0.0, 0.0))
    assert torch.equal(methods.geometric_median(t(0.0), t(1.0), t(10.0)), t(1.0))
    assert steps == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # An equilateral triangle's median is inside it: the iteration runs.
    s3 = math.sqrt(3)
    assert torch.allclose(methods.geometric_median(t(0.0, 0.0), t(2.0, 0.0), t(1.0, s3)), t(1.0, s3 / 3), atol=1e-5)
    assert all(0.3 < share < 0.34 for share in steps[-1])


def test_geometric_median_weights_pull_it_to_a_heavy_model():
    # A weight larger than the others' sum puts the median on that model.
    assert torch.allclose(methods.geometric_median(t(0.0), t(1.0), t(10.0), weights=[1, 1, 3]), t(10.0), atol=1e-5)


def test_geometric_median_is_robust_where_the_mean_is_not():
    g = torch.Generator().manual_seed(0)
    cluster = [torch.randn(1000, generator=g) * 0.01 for _ in range(4)]
    outlier = torch.full((1000,), 50.0)
    median = methods.geometric_median(*cluster, outlier)
    assert median.abs().max() < 0.05 < methods.linear(*cluster, outlier).abs().min()


# ---------------------------------------------------------------------------------------------
# Over a base


def test_task_arithmetic_adds_weighted_deltas():
    base, m1, m2 = t(1.0, 1.0), t(2.0, 1.0), t(1.0, 3.0)  # τ1 = (1, 0), τ2 = (0, 2)
    assert torch.allclose(methods.task_arithmetic(base, m1, m2, weights=[1, 0.5], alpha=2.0), t(3.0, 3.0))
    assert torch.allclose(methods.task_arithmetic(base, m1, m2, weights=[1, -1]), t(2.0, -1.0))


# A 2×3 TIES example worked by hand, base 10 everywhere. Per model, density 0.5 keeps the 3
# largest |τ| of 6 (threshold = the 3rd largest):
#   τ1 = [[ 3, -1, 0.5], [ 2, -4,  1]]   keeps 3, 2, -4          (threshold 2)
#   τ2 = [[-2, -3, 1  ], [0.5, 5, -1]]   keeps -2, -3, 5         (threshold 2)
#   τ3 = [[ 4,  2, -3 ], [-1, 0.25, 1]]  keeps 4, 2, -3          (threshold 2)
# weights 1, 1, 2. Elected sign = sign(Σ wᵢ·kept τᵢ):
#   (0,0): 3 - 2 + 8 = 9 (+): τ1 and τ3 agree -> (1·3 + 2·4) / (1 + 2) = 11/3
#   (0,1): -3 + 4 = 1 (+): τ3 only -> 2   (with the untrimmed -1 of τ1 the sum would be 0)
#   (0,2): -6 (-): τ3 -> -3
#   (1,0): 2 (+): τ1 -> 2
#   (1,1): -4 + 5 = 1 (+): τ2 -> 5
#   (1,2): nothing kept -> 0
TIES_TAUS = [t([3, -1, 0.5], [2, -4, 1]), t([-2, -3, 1], [0.5, 5, -1]), t([4, 2, -3], [-1, 0.25, 1])]
TIES_MERGED_DELTA = t([11 / 3, 2, -3], [2, 5, 0])


def test_ties_on_a_2x3_example_worked_by_hand():
    base = torch.full((2, 3), 10.0)
    out = methods.ties(base, *(base + tau for tau in TIES_TAUS), weights=[1, 1, 2], density=0.5, alpha=0.5)
    assert torch.allclose(out, base + 0.5 * TIES_MERGED_DELTA)


def test_ties_weights_only_matter_relative_to_each_other():
    base = torch.zeros(2, 3)
    models = [base + tau for tau in TIES_TAUS]
    assert torch.allclose(methods.ties(base, *models, weights=[1, 1, 2], density=0.5),
                          methods.ties(base, *models, weights=[0.5, 0.5, 1], density=0.5))


def test_ties_keeps_every_entry_tied_with_the_smallest_kept_magnitude():
    base = torch.zeros(4)
    # density 0.5 of 4 entries = 2, but the 2nd largest |τ| (2) is tied: both 2s are kept.
    assert torch.equal(methods.ties(base, t(1.0, -2.0, 2.0, 3.0), density=0.5), t(0.0, -2.0, 2.0, 3.0))


def test_ties_on_tiny_tensors_keeps_at_least_one_entry():
    assert torch.equal(methods.ties(torch.zeros(1), t(0.5), density=0.2), t(0.5))  # round(0.2) would be 0
    assert torch.equal(methods.ties(torch.zeros(3), t(0.1, -0.3, 0.2), density=0.2), t(0.0, -0.3, 0.0))
    scalar = methods.ties(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(2.0), density=0.5)
    assert scalar.shape == () and scalar.item() == 2.5
    assert methods.ties(torch.zeros(0), torch.zeros(0)).shape == (0,)


def test_ties_density_one_is_a_sign_elected_mean_and_zero_is_the_base():
    base = torch.zeros(3)
    m1, m2 = t(1.0, -1.0, 2.0), t(3.0, 1.0, -1.0)
    # every entry kept: (0) both +, mean 2; (1) -1 + 1 = 0: no sign, 0; (2) 2 - 1 = 1 (+): 2
    assert torch.equal(methods.ties(base, m1, m2, density=1.0), t(2.0, 0.0, 2.0))
    assert torch.equal(methods.ties(base, m1, m2, density=0.0), base)


def test_ties_refuses_bad_parameters():
    base, m = torch.zeros(3), torch.ones(3)
    with pytest.raises(LineageError, match="'ties': parameter 'density' must be in \\[0, 1\\], got 1.5"):
        methods.ties(base, m, density=1.5)
    with pytest.raises(LineageError, match="'ties': parameter 'weights' must be positive"):
        methods.ties(base, m, m, weights=[1, 0])
    with pytest.raises(LineageError, match="'ties': parameter 'weights' takes one number per model \\(2\\), got 1"):
        methods.ties(base, m, m, weights=[1])
    with pytest.raises(LineageError, match="'ties': parameter 'threshold' must be one of 'exact', 'sampled'"):
        methods.ties(base, m, threshold="approximate")


def _dare_mask(seed: int, stream: int, shape, density: float) -> torch.Tensor:
    return rng.keep_mask(seed, stream, shape, density)


def test_dare_linear_keeps_at_density_and_preserves_the_expectation():
    base = torch.zeros(1 << 20)
    tau = torch.full_like(base, 2.0)
    out = methods.dare_linear(base, base + tau, density=0.3, seed=5)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.003  # σ ≈ 0.0005
    assert torch.allclose(out[kept], torch.tensor(2.0 / 0.3))  # rescaled by 1/density
    assert abs(out.mean().item() - 2.0) < 0.02  # E[mask/density·τ] = τ


def test_dare_linear_is_task_arithmetic_of_the_masked_rescaled_deltas():
    base, m1, m2 = sample_inputs("dare_linear", shape=(6, 5))
    masks = [_dare_mask(11, stream, base.shape, 0.4) for stream in (1, 2)]
    expected = base + 0.5 * (2.0 * masks[0] * (m1 - base) / 0.4 + 1.0 * masks[1] * (m2 - base) / 0.4)
    out = methods.dare_linear(base, m1, m2, weights=[2, 1], density=0.4, alpha=0.5, seed=11)
    assert torch.allclose(out, expected, atol=1e-6)


def test_dare_ties_elects_signs_over_the_masked_rescaled_deltas():
    base = torch.zeros(2, 3)
    models = [base + tau for tau in TIES_TAUS]
    masks = [_dare_mask(3, stream, base.shape, 0.5) for stream in (1, 2, 3)]
    kept = [m * tau / 0.5 for m, tau in zip(masks, TIES_TAUS)]
    elected = kept[0] + kept[1] + 2 * kept[2]
    num = sum(w * k * (k * elected > 0) for w, k in zip((1, 1, 2), kept))
    den = sum(w * (k * elected > 0).float() for w, k in zip((1, 1, 2), kept))
    expected = torch.where(den > 0, num / den, 0.0)
    out = methods.dare_ties(base, *models, weights=[1, 1, 2], density=0.5, seed=3)
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della"])
def test_random_methods_reproduce_with_a_seed_and_change_with_another(name):
    inputs = sample_inputs(name, shape=(64, 64))
    first = call(name, *inputs, seed=42)
    assert torch.equal(call(name, *inputs, seed=42), first)
    assert not torch.equal(call(name, *inputs, seed=43), first)


def test_dare_draws_an_independent_mask_per_model():
    base = torch.zeros(4096)
    same = torch.ones(4096)
    out = methods.dare_linear(base, same, same, weights=[1, 0], density=0.5, seed=9)
    other = methods.dare_linear(base, same, same, weights=[0, 1], density=0.5, seed=9)
    agreement = ((out != 0) == (other != 0)).float().mean().item()
    assert 0.45 < agreement < 0.55  # independent masks agree on half the entries, equal ones on all


def test_dare_refuses_zero_density():
    with pytest.raises(LineageError, match="'dare_ties': parameter 'density' must be in \\(0, 1\\], got 0"):
        methods.dare_ties(torch.zeros(2), torch.ones(2), density=0, seed=1)


def test_della_keeps_large_magnitudes_more_often_and_preserves_the_expectation():
    rows, n = 400, 1000
    base = torch.zeros(rows, n)
    tau = torch.linspace(0.01, 1.0, n).repeat(rows, 1)  # rank r = column r in every row
    pruned = methods._della_deltas(base, [base + tau], seed=8, density=0.5, epsilon=0.2)[0]
    keep_rate = (pruned != 0).float().mean(dim=0)
    # p(rank r) = 0.5 - 0.2 + 0.4·(r + ½)/n: 0.3002 for the smallest, 0.6998 for the largest
    assert abs(keep_rate[:100].mean().item() - (0.3 + 0.4 * 0.05)) < 0.01
    assert abs(keep_rate[-100:].mean().item() - (0.7 - 0.4 * 0.05)) < 0.01
    assert abs(keep_rate.mean().item() - 0.5) < 0.005
    assert abs(pruned.mean(dim=0) / tau[0] - 1).mean().item() < 0.05  # E[mask/p·τ] = τ


def test_della_with_one_model_is_the_base_plus_the_pruned_delta():
    base, m = sample_inputs("della", shape=(8, 16), count=2)
    pruned = methods._della_deltas(base, [m], seed=4, density=0.6, epsilon=0.1)[0]
    assert torch.allclose(methods.della(base, m, density=0.6, epsilon=0.1, alpha=0.5, seed=4), base + 0.5 * pruned)


def test_della_refuses_an_epsilon_beyond_the_density():
    with pytest.raises(LineageError, match="epsilon must be in \\[0, min\\(density, 1 - density\\)\\]"):
        methods.della(torch.zeros(4), torch.ones(4), density=0.8, epsilon=0.3, seed=1)


def test_breadcrumbs_drops_the_largest_and_the_smallest_worked_by_hand():
    base = torch.zeros(10)
    tau = t(*range(1, 11)) * torch.tensor([1.0, -1.0] * 5)  # |τ| = 1..10
    # gamma 0.1 drops the largest (10); density 0.5 keeps the next 5 (9..5); the smallest 4 go.
    out = methods.breadcrumbs(base, base + tau, density=0.5, gamma=0.1, alpha=2.0)
    assert torch.equal(out, 2.0 * tau * (tau.abs() >= 5) * (tau.abs() < 10))


def test_breadcrumbs_keeps_small_tensors():
    # mergekit's version drops all 3 entries here (no entry is an outlier at gamma 0.01, and its
    # `sorted[n_bottom:-0]` selects nothing); we keep round(0.9·3) = 3 of them.
    base = torch.zeros(3)
    tau = t(0.5, -1.0, 2.0)
    assert torch.equal(methods.breadcrumbs(base, base + tau, density=0.9, gamma=0.01), tau)
    assert torch.equal(methods.breadcrumbs(torch.zeros(1), t(0.25)), t(0.25))


def test_breadcrumbs_weights_are_not_normalised_and_parameters_are_checked():
    base, m1, m2 = torch.zeros(4), t(1.0, 2.0, 3.0, 4.0), t(4.0, 3.0, 2.0, 1.0)
    out = methods.breadcrumbs(base, m1, m2, weights=[1, 2], density=1.0, gamma=0.0)
    assert torch.equal(out, m1 + 2 * m2)
    with pytest.raises(LineageError, match="density \\+ gamma must be at most 1"):
        methods.breadcrumbs(base, m1, density=0.95, gamma=0.1)


def test_model_stock_follows_its_formula():
    base = t(1.0, 1.0)
    m1, m2 = base + t(1.0, 0.0), base + t(1.0, 1.0)  # τ at 45°: cos θ = 1/√2
    cos = 1 / math.sqrt(2)
    ratio = 2 * cos / (1 + cos)  # k = 2
    average = (m1 + m2) / 2
    assert torch.allclose(methods.model_stock(base, m1, m2), ratio * average + (1 - ratio) * base)


def test_model_stock_with_three_models_averages_the_pairwise_cosines():
    base = torch.zeros(3)
    models = [t(1.0, 0.0, 0.0), t(1.0, 1.0, 0.0), t(0.0, 1.0, 0.0)]  # cosines 1/√2, 1/√2, 0
    cos = (2 / math.sqrt(2)) / 3
    ratio = 3 * cos / (1 + 2 * cos)
    assert torch.allclose(methods.model_stock(base, *models), ratio * sum(models) / 3)


def test_model_stock_orthogonal_or_zero_deltas_keep_the_base_and_equal_ones_the_average():
    base = t(1.0, 2.0)
    assert torch.equal(methods.model_stock(base, base + t(1.0, 0.0), base + t(0.0, 1.0)), base)
    assert torch.equal(methods.model_stock(base, base, base + t(0.0, 1.0)), base)
    same = base + t(0.5, 0.5)
    assert torch.allclose(methods.model_stock(base, same, same), same)


# ---------------------------------------------------------------------------------------------
# Exact thresholds on every tensor size


def _whole_tensor_threshold(tau: torch.Tensor, count: int) -> float:
    """The count-th largest |τ| by torch.kthvalue over the whole tensor (+inf for count 0)."""
    magnitudes = tau.abs().reshape(-1)
    return math.inf if count == 0 else torch.kthvalue(magnitudes, magnitudes.numel() - count + 1).values.item()


def reference_ties(base: torch.Tensor, models: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES written directly with whole-tensor operations (equal weights, alpha 1)."""
    count = max(1, math.floor(density * base.numel() + 0.5))
    trimmed = []
    for model in models:
        tau = model - base
        trimmed.append(torch.where(tau.abs() >= _whole_tensor_threshold(tau, count), tau, 0.0))
    elected = trimmed[0].clone()
    for tau in trimmed[1:]:
        elected += tau
    agreeing_sum, agreeing_count = torch.zeros_like(base), torch.zeros_like(base)
    for tau in trimmed:
        agrees = (tau * elected > 0).float()
        agreeing_sum += tau * agrees
        agreeing_count += agrees
    return torch.where(agreeing_count > 0, agreeing_sum / agreeing_count, 0.0) + base


def reference_breadcrumbs(base: torch.Tensor, models: list[torch.Tensor], density: float, gamma: float) -> torch.Tensor:
    n = base.numel()
    dropped = math.floor(gamma * n + 0.5)
    kept = min(max(1, math.floor(density * n + 0.5)), n - dropped)
    out = base.clone()
    for model in models:
        tau = model - base
        lower, upper = _whole_tensor_threshold(tau, dropped + kept), _whole_tensor_threshold(tau, dropped)
        out += torch.where((tau.abs() >= lower) & (tau.abs() < upper), tau, 0.0)
    return out


def large_models(kind: str = "fp16", shape=(700, 1100), count=2, seed=21) -> list[torch.Tensor]:
    """A base and fine-tunes with deltas of one kind: "fp16" (stored in fp16, as checkpoints are:
    the deltas take few distinct magnitudes, so thresholds fall among many ties), "integers" (ties
    of a seventh of the entries each), "continuous" (fp32, scales varying by column: no ties)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    if kind == "fp16":
        base = base.half().float()
        return [base] + [(base + torch.randn(shape, generator=g) * 1e-3).half().float() for _ in range(count)]
    if kind == "integers":
        return [base] + [base + torch.randint(-3, 4, shape, generator=g).float() for _ in range(count)]
    scale = torch.linspace(1e-4, 3e-3, shape[-1])
    return [base] + [base + torch.randn(shape, generator=g) * scale for _ in range(count)]


@pytest.mark.parametrize("density, kind", [(0.2, "fp16"), (0.05, "fp16"), (0.5, "integers"), (0.2, "continuous")])
def test_ties_equals_a_whole_tensor_reference_above_the_old_sample_size(density, kind):
    base, *models = large_models(kind)
    assert base.numel() > 1 << 18  # where a 262,144-entry sample used to stand in for the tensor
    expected = reference_ties(base, models, density)
    assert torch.equal(methods.ties(base, *models, density=density), expected)
    if kind == "continuous":  # the sampled estimate (still an option) does not: this test sees the difference
        assert not torch.equal(methods.ties(base, *models, density=density, threshold="sampled"), expected)


def test_ties_keeps_exactly_the_requested_count_on_a_large_tensor():
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(600, 3000, generator=g) * torch.linspace(0.1, 3, 3000)  # continuous: no ties
    kept = (methods.ties(torch.zeros_like(tau), tau, density=0.2) != 0).sum().item()
    assert kept == round(0.2 * tau.numel())


@pytest.mark.parametrize("density, gamma, kind", [(0.9, 0.01, "fp16"), (0.3, 0.1, "integers"), (0.5, 0.0, "fp16"),
                                                 (0.8, 0.05, "continuous")])
def test_breadcrumbs_equals_a_whole_tensor_reference_above_the_old_sample_size(density, gamma, kind):
    base, *models = large_models(kind, seed=5)
    expected = reference_breadcrumbs(base, models, density, gamma)
    assert torch.equal(methods.breadcrumbs(base, *models, density=density, gamma=gamma), expected)
    if kind == "continuous":
        sampled = methods.breadcrumbs(base, *models, density=density, gamma=gamma, threshold="sampled")
        assert not torch.equal(sampled, expected)


# ---------------------------------------------------------------------------------------------
# Non-finite inputs (the module doc's rule)

NAN, INF = math.nan, math.inf


def test_a_nan_or_inf_delta_never_takes_a_ties_slot():
    base = torch.zeros(4)
    # density 0.25 keeps one entry of four: the largest finite |τ| (5), not the NaN or the Inf.
    for odd in (NAN, INF, -INF):
        assert torch.equal(methods.ties(base, t(odd, 5.0, 1.0, 0.5), density=0.25), t(0.0, 5.0, 0.0, 0.0))
    # Above the old sample size too, where thresholds come from a bracketed pass.
    base, model = large_models("continuous", count=1)
    spoiled = model.clone().reshape(-1)
    spoiled[::1000] = NAN
    spoiled[7::1000] = INF
    spoiled = spoiled.reshape(model.shape)
    finite = torch.isfinite(spoiled)
    expected = reference_ties(base, [torch.where(finite, spoiled, base)], 0.2)  # as if those entries were unchanged
    out = methods.ties(base, spoiled, density=0.2)
    assert torch.isfinite(out).all()
    kept = (out != base).sum().item()
    assert kept == round(0.2 * base.numel()) and torch.equal(out, expected)


def test_breadcrumbs_drops_non_finite_deltas():
    base = torch.zeros(5)
    out = methods.breadcrumbs(base, t(NAN, INF, 3.0, 2.0, 1.0), density=0.4, gamma=0.2)  # drop 1 on top, keep 2
    assert torch.equal(out, t(0.0, 0.0, 0.0, 2.0, 1.0))


def test_a_dropped_nan_stays_dropped_in_dare_and_a_kept_one_stays_nan():
    base = torch.zeros(4096)
    model = torch.full((4096,), NAN)
    kept = _dare_mask(5, 1, base.shape, 0.3).bool()
    out = methods.dare_linear(base, model, density=0.3, seed=5)
    assert torch.equal(out[~kept], base[~kept])  # NaN·0 would be NaN
    assert out[kept].isnan().all()
    for name in ("dare_ties", "della"):
        out = call(name, base, model, density=0.3, seed=5)
        assert (out == 0).any() and out.isnan().any() and not out.isinf().any()


def test_inf_is_never_clamped_to_the_largest_float():
    base = torch.zeros(2048)
    model = torch.full((2048,), INF)
    for name in ("dare_linear", "dare_ties"):
        out = call(name, base, model, density=0.5, seed=1)
        assert set(out.unique().tolist()) == {0.0, INF}, name  # not 3.4e38
    assert methods.task_arithmetic(t(0.0), t(INF), alpha=0.5).item() == INF


def test_a_nan_does_not_turn_model_stocks_cosine_into_one():
    base = torch.zeros(3)
    models = [t(1.0, 0.0, NAN), t(0.0, 1.0, 0.0)]  # orthogonal where both are finite
    out = methods.model_stock(base, *models)
    assert torch.equal(out[:2], t(0.0, 0.0))  # t = 0: the base, as for orthogonal deltas (not the average)
    assert out[2].isnan()  # the NaN entry itself stays NaN


def test_slerp_and_geometric_median_leave_non_finite_entries_out_of_their_statistics():
    a, b = t(2.0, 0.0, 1.0), t(0.0, 2.0, NAN)
    out = methods.slerp(a, b, alpha=0.5)
    assert torch.allclose(out[:2], methods.slerp(a[:2], b[:2], alpha=0.5)) and out[2].isnan()
    points = [t(0.0, NAN), t(1.0, 5.0), t(10.0, 7.0)]
    median = methods.geometric_median(*points)
    assert torch.allclose(median[0], t(1.0)[0], atol=1e-5) and median[1].isnan()


# ---------------------------------------------------------------------------------------------
# Every parameter checked before any work: `lmerge merge --dry-run`


@pytest.mark.parametrize("args, message", [
    (("--method", "ties", "--param", "density=1.5"),
     "merge method 'ties': parameter 'density' must be in [0, 1], got 1.5"),
    (("--method", "ties", "--param", "density=abc"),
     "merge method 'ties': parameter 'density' must be a number, got 'abc'"),
    (("--method", "ties", "--param", "alpha=nan"),
     "merge method 'ties': parameter 'alpha' must be a finite number, got nan"),
    (("--method", "ties", "--param", "weights=1,2,3"),
     "merge method 'ties': parameter 'weights' takes one number per model (2), got 3: [1.0, 2.0, 3.0]"),
    (("--method", "dare_ties", "--param", "density=0"),
     "merge method 'dare_ties': parameter 'density' must be in (0, 1], got 0"),
    (("--method", "breadcrumbs", "--param", "density=0.95", "--param", "gamma=0.1"),
     "merge method 'breadcrumbs': density + gamma must be at most 1, got 0.95 + 0.1"),
    (("--method", "ties", "--param", "threshold=fast"),
     "merge method 'ties': parameter 'threshold' must be one of 'exact', 'sampled', got 'fast'"),
    (("--method", "ties", "--blocks", "nan" + ",0" * 19),
     "merge method 'ties': parameter 'alpha' must be a finite number, got nan (per_key.alpha block BASE)"),
])
def test_dry_run_refuses_a_bad_parameter_naming_it(lmerge, trio, tmp_path, args, message):
    code, _, stderr = lmerge("merge", trio["base"], trio["x"], trio["y"], "-o", tmp_path / "out.safetensors",
                             *args, "--dry-run")
    assert code == 1 and message in stderr and stderr.count("\n") == 1, stderr
    assert list(tmp_path.iterdir()) == []


def test_dry_run_checks_every_per_key_value_of_a_recipe(lmerge, trio, tmp_path):
    inputs = "".join(f'[[inputs]]\npath = "{trio[n]}"\n' for n in ("base", "x", "y"))
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "ties"\n[per_key.density]\noverrides = [{ pattern = "attn2", value = 1.5 }]\n' + inputs)
    code, _, stderr = lmerge("merge", "--recipe", recipe, "-o", tmp_path / "out.safetensors", "--dry-run")
    assert code == 1 and stderr.count("\n") == 1
    assert "parameter 'density' must be in [0, 1], got 1.5 (per_key.density override 'attn2')" in stderr
    # Values fine one by one but not together on some keys: the key is named.
    recipe.write_text('method = "breadcrumbs"\n[params]\ndensity = 0.95\n'
                      '[per_key.gamma]\noverrides = [{ pattern = "attn2\\\\.to_k", value = 0.1 }]\n' + inputs)
    code, _, stderr = lmerge("merge", "--recipe", recipe, "-o", tmp_path / "out.safetensors", "--dry-run")
    assert code == 1 and stderr.count("\n") == 1
    assert "density + gamma must be at most 1, got 0.95 + 0.1 (key model.diffusion_model." in stderr
    assert ".attn2.to_k." in stderr


def test_methods_lists_types_peer_differences_and_the_non_finite_rule(lmerge, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, stdout, _ = lmerge("methods")
    assert code == 0
    assert max(len(line) for line in stdout.splitlines()) <= 80  # fitted to an 80-column terminal
    words = " ".join(stdout.split())  # the text re-wrapped to the terminal, compared word by word
    assert "density: number in [0, 1]" in stdout and "threshold: exact | sampled" in stdout
    for peer_note in ("lerp(‖A‖, ‖B‖, alpha)", "vote_sgn", "della_eps"):  # SLERP norms, TIES signs, DELLA
        assert peer_note in words
    assert " ".join(methods.NONFINITE_RULE.split()) in words
    assert "never takes a TIES" not in methods.NONFINITE_RULE[:20]
    code, stdout, _ = lmerge("methods", "ties")
    assert code == 0 and stdout.startswith("ties  [base first, elementwise]") and "sampled" in stdout
