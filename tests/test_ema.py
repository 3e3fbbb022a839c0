"""Power-function EMA and its post-hoc reconstruction (EDM2 section 3, App. C), each against an
independent reference: numerical integration of the profiles, closed-form EMA weights computed
with numpy, an EMA tracked directly at the reconstructed length, and a hand-written least squares."""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import diffuse.ema as ema
from diffuse.ema import (PowerEMA, gamma_to_sigma_rel, list_snapshots, power_ema_beta, reconstruct,
                         sigma_rel_to_gamma, solve_weights)
from diffuse.errors import UserError


def integrate(f, a, b, nodes=200):
    """Gauss-Legendre quadrature of f over [a, b] (broadcast over the leading dims of a and b)."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    a, b = np.asarray(a, float)[..., None], np.asarray(b, float)[..., None]
    return ((b - a) / 2 * w * f(a + (b - a) / 2 * (x + 1))).sum(-1)


def profile(tau, gamma, t):
    """The power-function averaging profile, written out: (gamma+1) tau^gamma / t^(gamma+1) on [0, t]."""
    return np.where(tau <= t, (gamma + 1) * tau ** gamma / t ** (gamma + 1), 0.0)


# ---------------------------------------------------------------------------------------------
# sigma_rel <-> gamma


def test_known_values_from_the_paper():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(0.2887, abs=5e-5)
    assert sigma_rel_to_gamma(math.sqrt(1 / 12)) == pytest.approx(0.0, abs=1e-12)


def test_round_trips():
    for sigma_rel in np.geomspace(1e-3, 0.2886, 60):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma >= 0
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in [0.0, 0.01, 0.5, 1.0, 3.0, 6.94, 16.97, 100.0, 1e4]:
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0, 6.94, 16.97, 60.0])
def test_sigma_rel_is_the_std_of_relative_time_under_the_profile(gamma):
    # sigma_rel is the std of tau / t when tau has density p(tau; gamma, t); integrate it numerically,
    # over u with tau = t u^2 so that the integrand is smooth at 0 for fractional gamma
    t = 1000.0
    moment = lambda j: integrate(lambda u: (u * u) ** j * profile(t * u * u, gamma, t) * 2 * t * u, 0, 1)
    mass, mean, second = moment(0), moment(1), moment(2)
    assert mass == pytest.approx(1.0, rel=1e-12)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(second - mean ** 2), rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.01, 0.289, 0.5, float("nan")])
def test_sigma_rel_out_of_range_is_a_user_error(bad):
    with pytest.raises(UserError, match=r"sigma_rel must lie in \(0, 0.2887\]") as e:
        sigma_rel_to_gamma(bad)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


# ---------------------------------------------------------------------------------------------
# Tracking


def one_param_model(n):
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(n))
    return model


def test_first_update_copies():
    assert power_ema_beta(64, 64, 16.97) == 0.0
    model = one_param_model(5)
    tracker = PowerEMA(model)
    model.w.data.normal_()
    tracker.update(model, 64)
    for i in range(2):
        assert torch.equal(tracker.averages[i]["w"], model.w.data)


def test_tracked_ema_equals_the_closed_form_weights():
    # constant batch b, nimg = k b: prod_{j>k} beta_j telescopes to (k/K)^(gamma+1), so theta_k has the
    # weight (k^(gamma+1) - (k-1)^(gamma+1)) / K^(gamma+1), exactly the profile integrated over step k
    K, batch, gamma = 50, 8, sigma_rel_to_gamma(0.10)
    traj = np.random.default_rng(0).normal(size=(K, 7))
    model, tracker = one_param_model(7), PowerEMA(one_param_model(7), (0.10,))
    for k in range(K):
        model.w.data.copy_(torch.from_numpy(traj[k]))
        tracker.update(model, (k + 1) * batch)
    k = np.arange(1, K + 1)
    weights = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / K ** (gamma + 1)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(tracker.averages[0]["w"].numpy(), weights @ traj, rtol=1e-5, atol=1e-6)


def test_tracked_ema_equals_the_product_of_betas_with_varying_batches():
    rng = np.random.default_rng(1)
    batches = rng.integers(1, 40, size=60)
    nimgs = np.cumsum(batches)
    traj = rng.normal(size=(60, 9))
    model, tracker = one_param_model(9), PowerEMA(one_param_model(9), (0.05, 0.2))
    for theta, nimg in zip(traj, nimgs):
        model.w.data.copy_(torch.from_numpy(theta))
        tracker.update(model, int(nimg))
    for i, sigma_rel in enumerate((0.05, 0.2)):
        beta = (1 - batches / nimgs) ** (sigma_rel_to_gamma(sigma_rel) + 1)
        # theta_K = sum_k (1 - beta_k) prod_{j>k} beta_j theta_k
        later = np.append(np.cumprod(beta[::-1])[::-1][1:], 1.0)
        np.testing.assert_allclose(tracker.averages[i]["w"].numpy(), ((1 - beta) * later) @ traj, rtol=1e-5, atol=1e-6)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def step(model, seed):
    """A fake optimizer step: perturb the parameters, run a forward pass that moves the BN buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()(torch.randn(16, 3, generator=g))


def test_buffers_are_copied_and_parameters_kept_in_float32():
    model = bn_model().to(torch.bfloat16)
    tracker = PowerEMA(model)
    for k in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            model[1].running_mean.add_(k)
            model[1].num_batches_tracked.add_(1)
        tracker.update(model, 16 * k)
    state = tracker.ema_state_dict(0)
    assert state["0.weight"].dtype == torch.float32 and state["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(state["1.running_mean"], model[1].running_mean)  # copied, not averaged
    assert state["1.num_batches_tracked"].item() == 5
    assert not torch.equal(state["0.weight"], model[0].weight.float())  # averaged


def test_state_dict_round_trip_continues_bit_identically(tmp_path):
    model, twin = bn_model(), bn_model()
    straight = PowerEMA(model, (0.05, 0.10, 0.2))
    for k in range(1, 21):
        step(model, k)
        straight.update(model, 32 * k)
    tensors, meta = straight.state_dict()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "phema.safetensors")
    (tmp_path / "phema.json").write_text(json.dumps(meta))

    twin.load_state_dict(model.state_dict())
    resumed = PowerEMA(twin, (0.05, 0.10, 0.2))
    saved = load_file(tmp_path / "phema.safetensors"), json.loads((tmp_path / "phema.json").read_text())
    resumed.load_state_dict(*saved)
    for k in range(21, 41):
        step(model, k), step(twin, k)
        straight.update(model, 32 * k)
        resumed.update(twin, 32 * k)
    a, b = straight.state_dict()[0], resumed.state_dict()[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="tracks sigma_rel"):
        PowerEMA(twin).load_state_dict(tensors, meta)


# ---------------------------------------------------------------------------------------------
# Snapshot files


def test_snapshot_files_names_metadata_and_order(tmp_path):
    model = bn_model()
    tracker = PowerEMA(model)
    for k, nimg in enumerate([512, 1024, 10240, 123456789], start=1):
        step(model, k)
        tracker.update(model, nimg)
        tracker.save_snapshots(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names[:2] == ["phema-000000000512-0.050.safetensors", "phema-000000000512-0.100.safetensors"]
    assert names[-1] == "phema-000123456789-0.100.safetensors"
    assert [int(n.split("-")[1]) for n in names] == [512, 512, 1024, 1024, 10240, 10240, 123456789, 123456789]
    with safe_open(tmp_path / names[-1], framework="pt") as f:
        meta = f.metadata()
    assert int(meta["nimg"]) == 123456789 and float(meta["sigma_rel"]) == 0.10
    assert float(meta["gamma"]) == sigma_rel_to_gamma(0.10)
    listed = list_snapshots(tmp_path)
    assert sorted(p.name for p, _, _ in listed) == names
    assert [n for _, n, _ in listed] == [512, 512, 1024, 1024, 10240, 10240, 123456789, 123456789]
    assert [g for _, _, g in listed[:2]] == [sigma_rel_to_gamma(0.10), sigma_rel_to_gamma(0.05)]  # sorted by gamma
    # the file holds a whole model state dict: parameters in float32 and the buffers
    model.load_state_dict(load_file(tmp_path / names[-1]))
    assert torch.equal(model[0].weight, tracker.averages[1]["0.weight"])
    with pytest.raises(ValueError):
        tracker.save_snapshots(tmp_path, nimg=1)  # not the time of the last update


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    model = one_param_model(4)
    tracker = PowerEMA(model, (0.1,))
    tracker.update(model, 10)
    (path,) = tracker.save_snapshots(tmp_path)
    before = path.read_bytes()

    def torn_write(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ema, "save_file", torn_write)
    with pytest.raises(UserError, match="could not write .*phema"):
        tracker.save_snapshots(tmp_path)
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Reconstruction weights against a hand-written least squares over numerically integrated profiles


def reference_solution(gammas, times, target_gamma, target_time):
    """Unnormalized least-squares coefficients: A_ij and B_i by quadrature of profile products."""
    g, t = np.asarray(gammas, float), np.asarray(times, float) / target_time

    def inner(ga, ta, gb, tb):  # integral over 0 < tau < min(ta, tb) of the product of two profiles
        ga, ta, gb, tb = np.broadcast_arrays(ga, ta, gb, tb)
        product = lambda tau: profile(tau, ga[..., None], ta[..., None]) * profile(tau, gb[..., None], tb[..., None])
        return integrate(product, 0, np.minimum(ta, tb))

    A = inner(g[:, None], t[:, None], g[None], t[None])
    B = inner(g, t, target_gamma, 1.0)
    return np.linalg.solve(A, B)


SNAPSHOT_GAMMAS = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)]


def snapshot_grid(every, last):
    times = np.arange(every, last + 1, every, dtype=float)
    return np.repeat(SNAPSHOT_GAMMAS, len(times)), np.tile(times, 2)


@pytest.mark.parametrize("target_sigma_rel", [0.03, 0.07, 0.15, 0.25])
def test_weights_match_an_independent_least_squares_and_sum_to_one(target_sigma_rel):
    gammas, times = snapshot_grid(1000, 10000)
    weights = solve_weights(gammas, times, sigma_rel_to_gamma(target_sigma_rel))
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    X = reference_solution(gammas, times, sigma_rel_to_gamma(target_sigma_rel), 10000)
    np.testing.assert_allclose(weights, X / X.sum(), rtol=1e-9, atol=1e-11)  # measured 1e-13


def test_snapshots_after_the_target_time_are_ignored():
    gammas, times = snapshot_grid(1000, 10000)
    target = sigma_rel_to_gamma(0.07)
    weights = solve_weights(gammas, times, target, target_time=6000)
    early = times <= 6000
    assert np.all(weights[~early] == 0)
    without_later = solve_weights(gammas[early], times[early], target)
    np.testing.assert_allclose(weights[early], without_later, rtol=1e-12, atol=1e-14)
    with pytest.raises(UserError, match="no snapshot was taken at 6500"):
        solve_weights(gammas, times, target, target_time=6500)


def test_reconstructing_a_tracked_length_gives_its_snapshot_weight_one():
    gammas, times = snapshot_grid(1000, 10000)
    for gamma in SNAPSHOT_GAMMAS:
        weights = solve_weights(gammas, times, gamma, target_time=8000)
        expected = (gammas == gamma) & (times == 8000)
        np.testing.assert_allclose(weights, expected.astype(float), atol=1e-12)  # measured 8e-15


# ---------------------------------------------------------------------------------------------
# End to end on a synthetic training trajectory

K, N, BATCH, EVERY = 4000, 256, 4, 200  # steps, parameters, images per step, steps between snapshots
UNTRACKED = (0.07, 0.15)
MID = K // 2 * BATCH


def synthetic_trajectory():
    """(K, N) float32: weights of magnitude ~5 that drift, oscillate and carry per-step noise (spread ~0.5)."""
    rng = np.random.default_rng(0)
    x = np.arange(1, K + 1)[:, None] / K
    offset, start = rng.normal(0, 5, N), rng.normal(0, 1, N)
    freq, phase = rng.uniform(0.5, 3, N), rng.uniform(0, 2 * np.pi, N)
    smooth = offset + 0.5 * np.sin(2 * np.pi * freq * x + phase) + (1 - x) ** 2 * start
    return (smooth + 0.3 * rng.normal(size=(K, N))).astype(np.float32)


def train(directory, trajectory, sigma_rels, save=True):
    """Track PowerEMAs over the trajectory; return {nimg: {sigma_rel: EMA}} at MID and the end."""
    model = one_param_model(N)
    tracker = PowerEMA(model, sigma_rels)
    seen = {}
    for k, theta in enumerate(trajectory, start=1):
        model.w.data.copy_(torch.from_numpy(theta))
        tracker.update(model, k * BATCH)
        if save and k % EVERY == 0:
            tracker.save_snapshots(directory)
        if k * BATCH in (MID, K * BATCH):
            seen[k * BATCH] = {s: tracker.averages[i]["w"].clone() for i, s in enumerate(sigma_rels)}
    return seen


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("phema")
    trajectory = synthetic_trajectory()
    tracked = train(directory, trajectory, (0.05, 0.10))
    direct = train(None, trajectory, UNTRACKED, save=False)
    spread = float(trajectory.std(0).mean())  # how far a weight moves over training
    return directory, trajectory, tracked, direct, spread


def rel_error(a, b, spread):
    """RMS of a - b over the parameters, relative to the trajectory's spread."""
    return ((a.double() - b.double()).pow(2).mean().sqrt() / spread).item()


def test_reconstructing_a_tracked_length_reproduces_that_ema(run):
    # the target profile is one snapshot's, so the weights are that snapshot's unit vector up to
    # cond(A) * eps64 (measured 1e-14); what is left is the float32 rounding of the sum, at most a few
    # ulp of |theta| ~ 5, so 1e-6 relative + absolute bounds it with room (measured: bit-identical)
    directory, _, tracked, _, _ = run
    for nimg in (MID, K * BATCH):
        for sigma_rel in (0.05, 0.10):
            got, want = reconstruct(directory, sigma_rel, nimg)["w"], tracked[nimg][sigma_rel]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# RMS error / spread that the reconstruction must meet; measured 7.3e-5, 1.8e-4 (end), 5.3e-4, 1.7e-3 (MID):
# least squares over 20 snapshots per tracked EMA (10 at MID) cannot fit the target profile exactly
TOLERANCE = {(K * BATCH, 0.07): 2e-4, (K * BATCH, 0.15): 5e-4, (MID, 0.07): 1.5e-3, (MID, 0.15): 4e-3}


@pytest.mark.parametrize("nimg,sigma_rel", list(TOLERANCE))
def test_reconstruction_of_an_untracked_length_matches_a_directly_tracked_ema(run, nimg, sigma_rel):
    directory, _, _, direct, spread = run
    got = reconstruct(directory, sigma_rel, None if nimg == K * BATCH else nimg)["w"]
    assert rel_error(got, direct[nimg][sigma_rel], spread) < TOLERANCE[nimg, sigma_rel]


def weighted_sum(directory, weights):
    snapshots = list_snapshots(directory)
    return sum(w * load_file(path)["w"].double() for (path, _, _), w in zip(snapshots, weights) if w)


@pytest.fixture(scope="module")
def buggy_exponent_run(run, tmp_path_factory):
    """Snapshots of the same training, tracked with beta = (1 - batch/nimg)^gamma: the known bug."""
    directory = tmp_path_factory.mktemp("phema-bug")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ema, "power_ema_beta", lambda nimg, batch, gamma: (1 - batch / nimg) ** gamma)
        train(directory, run[1], (0.05, 0.10))
    return directory


@pytest.mark.parametrize("nimg,sigma_rel", list(TOLERANCE))
def test_the_known_bugs_would_fail_the_tolerance(run, buggy_exponent_run, nimg, sigma_rel):
    directory, _, _, direct, spread = run
    want, tol = direct[nimg][sigma_rel], TOLERANCE[nimg, sigma_rel]
    snapshots = list_snapshots(directory)
    gammas, times = [g for _, _, g in snapshots], [t for _, t, _ in snapshots]
    # 1. unnormalized least-squares coefficients (the weights of the parameters' large mean do not sum to 1)
    X = reference_solution([g for g, t in zip(gammas, times) if t <= nimg], [t for t in times if t <= nimg],
                           sigma_rel_to_gamma(sigma_rel), nimg)
    unnormalized = np.concatenate([X, np.zeros(len(times) - len(X))])  # list_snapshots sorts by time
    assert rel_error(weighted_sum(directory, unnormalized), want, spread) > tol  # 1.8x to 11x tol
    # 2. sigma_rel passed where the solver expects gamma
    swapped = solve_weights(gammas, times, sigma_rel, nimg)
    assert rel_error(weighted_sum(directory, swapped), want, spread) > 50 * tol  # 100x to 3500x
    # 3. EMAs tracked with the exponent gamma instead of gamma + 1
    got = reconstruct(buggy_exponent_run, sigma_rel, nimg)["w"]
    assert rel_error(got, want, spread) > 5 * tol  # 11x to 180x


def test_later_snapshots_do_not_touch_an_earlier_reconstruction(run, tmp_path):
    directory, _, _, _, _ = run
    for path, nimg, _ in list_snapshots(directory):
        if nimg <= MID:
            (tmp_path / path.name).write_bytes(path.read_bytes())
    before = reconstruct(tmp_path, 0.07)
    for sigma_rel in ("0.050", "0.100"):  # a later snapshot full of NaN must not be read
        ema.write_safetensors_atomic(tmp_path / f"phema-{MID + 800:012d}-{sigma_rel}.safetensors",
                                     {"w": torch.full((N,), float("nan"))},
                                     {"nimg": str(MID + 800), "gamma": repr(sigma_rel_to_gamma(float(sigma_rel))),
                                      "sigma_rel": sigma_rel, "buffers": "[]"})
    assert torch.equal(reconstruct(tmp_path, 0.07, MID)["w"], before["w"])
    assert torch.isnan(reconstruct(tmp_path, 0.07)["w"]).all()


def test_reconstruct_copies_buffers_from_the_latest_snapshot_used(tmp_path):
    model = bn_model()
    tracker = PowerEMA(model)
    buffers = {}
    for k in range(1, 7):
        step(model, k)
        tracker.update(model, 100 * k)
        tracker.save_snapshots(tmp_path)
        buffers[100 * k] = {n: b.clone() for n, b in model.named_buffers()}
    state = reconstruct(tmp_path, 0.08, at_nimg=400)
    for name, b in buffers[400].items():
        assert torch.equal(state[name], b)
    assert state["0.weight"].dtype == torch.float32
    model.load_state_dict(state)  # a whole state dict for the model


def test_reconstruct_user_errors(tmp_path):
    with pytest.raises(UserError, match="holds no power-EMA snapshots"):
        reconstruct(tmp_path, 0.1)
    model = one_param_model(3)
    tracker = PowerEMA(model)
    tracker.update(model, 100)
    tracker.save_snapshots(tmp_path)
    with pytest.raises(UserError, match="no power-EMA snapshot was taken at 50 images"):
        reconstruct(tmp_path, 0.1, at_nimg=50)
    with pytest.raises(UserError, match="sigma_rel must lie in"):
        reconstruct(tmp_path, 0.3)
    (tmp_path / "phema-000000000200-0.050.safetensors").write_bytes(b"torn")
    with pytest.raises(UserError, match="is damaged or lacks its nimg and gamma metadata"):
        reconstruct(tmp_path, 0.1)
