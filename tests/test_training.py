"""fit: the SVI step it takes, KL warm-up, NaN safety, schedules, clipping, early stopping, callbacks."""

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.utils.data import DataLoader, TensorDataset

from pyro_flowguides import DataSummary
from pyro_flowguides.datasets import DatasetELBO, DatasetLoader
from pyro_flowguides.guide import AutoFlowGuide
from pyro_flowguides.training import (
    ModelStructureError,
    NonFiniteLossError,
    ScaleLatents,
    SyncFreeTrace_ELBO,
    fit,
    kl_warmup_weight,
)

X_OBS = 1.3  # one observation of z ~ N(0, 1), x | z ~ N(z, 1)


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def one_latent_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(X_OBS))


def fixed_gaussian_guide(m=0.4, s=0.7):
    def guide():
        pyro.sample("z", dist.Normal(m, s))

    return guide


def param_values():
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def snapshot_each_step(snapshots):
    def callback(history):
        snapshots[history.steps] = param_values()

    return callback


# -- the step -------------------------------------------------------------------------------------


def test_fit_recovers_a_conjugate_posterior():
    x = torch.randn(40, generator=torch.Generator().manual_seed(1)) + 2.0
    guide = AutoNormal(normal_model)
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.994}
    )
    history = fit(normal_model, guide, x, num_steps=500, optim=optim, progress=False)
    # posterior N(sum x / (n + 1/100), 1 / (n + 1/100))
    precision = len(x) + 0.01
    loc, scale = guide._get_loc_and_scale("mu")
    assert history.steps == 500 and all(math.isfinite(v) for v in history.loss)
    assert loc.item() == pytest.approx(x.sum().item() / precision, abs=0.03)  # a fifth of a posterior sd
    assert scale.item() == pytest.approx(precision**-0.5, rel=0.1)


def test_fit_trains_an_autoflowguide_with_a_decaying_learning_rate():
    x = torch.randn(30, generator=torch.Generator().manual_seed(2)) - 1.0
    guide = AutoFlowGuide(normal_model, flow="planar", num_flows=2)
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.996}
    )
    fit(normal_model, guide, x, num_steps=800, optim=optim, progress=False)
    lower, median, upper = guide.quantiles([0.16, 0.5, 0.84])["mu"].tolist()
    precision = len(x) + 0.01
    assert median == pytest.approx(x.sum().item() / precision, abs=0.06)  # a third of a posterior sd
    assert (upper - lower) / 2 == pytest.approx(precision**-0.5, rel=0.15)


def test_fit_takes_the_steps_svi_takes():
    """Same seed, same optimizer: fit's losses and final parameters are SVI.step's, exactly."""
    x = torch.randn(20, generator=torch.Generator().manual_seed(6)) + 1.0
    results = []
    for run in ("svi", "fit"):
        pyro.clear_param_store()
        pyro.set_rng_seed(8)
        guide = AutoFlowGuide(normal_model, flow="planar", num_flows=2)
        optim = pyro.optim.Adam({"lr": 0.05})
        if run == "svi":
            svi = pyro.infer.SVI(normal_model, guide, optim, Trace_ELBO())
            losses = [svi.step(x) for _ in range(15)]
        else:
            losses = fit(normal_model, guide, x, num_steps=15, optim=optim, progress=False).loss
        results.append((losses, param_values()))
    (svi_losses, svi_params), (fit_losses, fit_params) = results
    assert fit_losses == svi_losses
    assert all(torch.equal(fit_params[name], value) for name, value in svi_params.items())


def test_sync_free_elbo_matches_trace_elbo_loss_and_gradients():
    x = torch.randn(20, generator=torch.Generator().manual_seed(3))
    guide = AutoFlowGuide(normal_model, flow="planar", num_flows=2)
    guide(x)
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    results = []
    for elbo in (Trace_ELBO(num_particles=3), SyncFreeTrace_ELBO(num_particles=3)):
        pyro.set_rng_seed(5)
        loss = elbo.loss_and_grads(normal_model, guide, x)
        results.append((float(loss), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


def test_sync_free_elbo_refuses_a_non_reparameterised_guide_site():
    def model():
        pyro.sample("k", dist.Bernoulli(0.3))

    def guide():
        pyro.sample("k", dist.Bernoulli(pyro.param("p", torch.tensor(0.5))))

    with pytest.raises(ValueError, match=r"guide site 'k' \(Bernoulli\) is not reparameterised.*Trace_ELBO"):
        SyncFreeTrace_ELBO().loss_and_grads(model, guide)


# -- KL warm-up -----------------------------------------------------------------------------------


def test_kl_warmup_weight_is_linear_then_one():
    assert [kl_warmup_weight(t, 5) for t in range(7)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0]
    assert kl_warmup_weight(0, 0) == 1.0


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_scaled_latents_give_the_annealed_elbo(beta):
    """-(E_q log p(x|z) - β KL(q || p)) in closed form for q = N(m, s²), p = N(0, 1), x|z ~ N(z, 1)."""
    m, s = 0.4, 0.7
    expected_log_lik = -0.5 * math.log(2 * math.pi) - 0.5 * ((X_OBS - m) ** 2 + s**2)
    kl = -math.log(s) + 0.5 * (s**2 + m**2) - 0.5
    expected = -(expected_log_lik - beta * kl)
    elbo = Trace_ELBO(num_particles=200_000, vectorize_particles=True, max_plate_nesting=0)
    loss = elbo.loss(ScaleLatents(beta)(one_latent_model), ScaleLatents(beta)(fixed_gaussian_guide(m, s)))
    # the per-draw loss has standard deviation below 1, so 200k draws give about ±0.002
    assert loss == pytest.approx(expected, abs=0.01)


def test_scaled_latents_weigh_each_draw_exactly():
    """For the draw z: loss = -(log p(x | z) + β (log p(z) - log q(z)))."""
    beta, guide = 0.3, fixed_gaussian_guide()
    pyro.set_rng_seed(7)
    loss = Trace_ELBO().loss(ScaleLatents(beta)(one_latent_model), ScaleLatents(beta)(guide))
    pyro.set_rng_seed(7)
    z = poutine.trace(guide).get_trace().nodes["z"]["value"]
    log_lik = dist.Normal(z, 1.0).log_prob(torch.tensor(X_OBS))
    log_ratio = dist.Normal(0.0, 1.0).log_prob(z) - dist.Normal(0.4, 0.7).log_prob(z)
    assert loss == pytest.approx(-(log_lik + beta * log_ratio).item(), rel=1e-6)


def test_fit_anneals_step_by_step():
    """With the parameters held still (SGD, lr 0), step t's loss is the β_t-weighted loss of its draw."""
    guide = fixed_gaussian_guide()
    pyro.set_rng_seed(11)
    history = fit(
        one_latent_model, guide, num_steps=6, kl_warmup=4, optim=pyro.optim.SGD({"lr": 0.0}), progress=False
    )
    pyro.set_rng_seed(11)
    expected = [
        Trace_ELBO().loss(
            ScaleLatents(kl_warmup_weight(t, 4))(one_latent_model),
            ScaleLatents(kl_warmup_weight(t, 4))(guide),
        )
        for t in range(6)
    ]
    assert history.loss == pytest.approx(expected, rel=1e-6)


def test_warmup_counts_epochs_with_data():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    class RecordBeta(poutine.messenger.Messenger):
        def __init__(self):
            super().__init__()
            self.betas = []

        def _pyro_post_sample(self, msg):
            if msg["name"] == "z":
                self.betas.append(msg["scale"])

    record = RecordBeta()
    guide = AutoNormal(model)
    data = [(torch.ones(3),), (torch.zeros(3),)]
    fit(record(model), guide, data=data, epochs=4, kl_warmup=2, progress=False)
    assert record.betas == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


# -- non-finite steps -----------------------------------------------------------------------------


def delta_guide():
    pyro.sample("z", dist.Delta(pyro.param("loc", torch.tensor(0.0))))


def model_blowing_up_above(threshold, how):
    """z ~ N(0, 1), x = 5 ~ N(z, 1); beyond ``threshold`` the model breaks in the way ``how`` says.

    With a Delta guide and SGD(lr 0.1) the loss is deterministic and loc goes 0.5, 0.9, 1.22, ...
    """

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if how == "inf_scale":
            scale = torch.where(z > threshold, torch.tensor(math.inf), torch.tensor(1.0))
            pyro.sample("x", dist.Normal(z, scale), obs=torch.tensor(5.0))
        elif how == "inf_gradient":  # a finite loss whose gradient is infinite: d sqrt(u) / du at u = 0
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(5.0))
            u = torch.where(z > threshold, z - z.detach(), torch.ones(()))
            pyro.factor("kink", u.sqrt())
        else:  # invalid distribution parameters
            loc = torch.where(z > threshold, torch.tensor(math.nan), z)
            pyro.sample("x", dist.Normal(loc, 1.0), obs=torch.tensor(5.0))

    return model


@pytest.mark.filterwarnings("ignore:Encountered")
@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("inf_scale", r"the loss is inf.*model site 'x' has a non-finite log-density"),
        ("inf_gradient", r"not finite: non-finite gradients of parameter\(s\) 'loc'\. The step"),
        ("invalid", r"a distribution got invalid parameters.*Normal"),
    ],
)
def test_nonfinite_step_is_not_applied_and_is_named(how, named):
    snapshots = {}
    with pytest.raises(NonFiniteLossError, match=named) as raised:
        fit(
            model_blowing_up_above(1.0, how),
            delta_guide,
            num_steps=10,
            optim=pyro.optim.SGD({"lr": 0.1}),
            callbacks=[snapshot_each_step(snapshots)],
            progress=False,
        )
    error = raised.value
    assert error.step == 4 and "step 4 is not finite" in str(error)
    assert "parameters keep their values from step 3" in str(error) and "lower learning rate" in str(error)
    assert torch.equal(pyro.param("loc").detach(), snapshots[3]["loc"])
    assert pyro.param("loc").item() == pytest.approx(1.22)
    assert pyro.param("loc").grad is None or torch.equal(pyro.param("loc").grad, torch.zeros(()))


@pytest.mark.filterwarnings("ignore:Encountered")
@pytest.mark.parametrize("check_finite", [True, False])
def test_a_nonfinite_guide_parameter_is_named_when_a_model_site_refuses_its_value(check_finite):
    """The guide does not re-validate its own parameters each step; a NaN location then reaches the
    model as a latent value, whose validation error ``fit`` turns into a named failure."""

    def model():
        pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoFlowGuide(model, flow="planar", init_loc_fn=lambda site: torch.full((2,), math.nan))
    with pytest.raises(NonFiniteLossError, match=r"got invalid values.*'AutoFlowGuide\.loc' hold NaN"):
        fit(model, guide, num_steps=3, check_finite=check_finite, progress=False)


@pytest.mark.filterwarnings("ignore:Encountered")
def test_retry_lowers_the_learning_rate_and_goes_on():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        scale = torch.where(z > 1.2, torch.tensor(math.inf), torch.tensor(1.0))  # about 1 draw in 9
        pyro.sample("x", dist.Normal(z, scale), obs=torch.tensor(0.0))

    guide = AutoNormal(model, init_scale=1.0)
    optim = pyro.optim.SGD({"lr": 0.01})
    with pytest.warns(RuntimeWarning, match="learning rate was multiplied by 0.5"):
        history = fit(model, guide, num_steps=40, optim=optim, on_nonfinite="retry", progress=False)
    assert history.steps == 40 and all(math.isfinite(v) for v in history.loss)
    assert len(history.lr_drops) >= 1
    expected_lr = 0.01 * 0.5 ** len(history.lr_drops)
    for opt in optim.optim_objs.values():
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Encountered", "ignore::RuntimeWarning")
def test_retry_gives_up_after_max_retries():
    optim = pyro.optim.SGD({"lr": 0.1})
    with pytest.raises(NonFiniteLossError, match=r"step 1 is not finite \(also after 2 retries"):
        fit(
            model_blowing_up_above(-1.0, "inf_scale"),
            delta_guide,
            num_steps=5,
            optim=optim,
            on_nonfinite="retry",
            max_retries=2,
            progress=False,
        )
    assert pyro.param("loc").item() == 0.0


def test_huge_but_finite_gradients_are_applied():
    """Gradients of 3e38 are finite although their float32 sum overflows: the step is taken."""

    def model():
        w = pyro.param("w", torch.zeros(2))
        pyro.factor("f", -(3e38 * w).sum())

    fit(model, lambda: None, num_steps=1, optim=pyro.optim.SGD({"lr": 1e-38}), progress=False)
    torch.testing.assert_close(pyro.param("w").detach(), torch.full((2,), -3.0))


def test_clipping_bounds_the_gradient_norm():
    """At loc = 0 the gradient is -5; clipped to norm 0.5, SGD(lr 1) moves loc by 0.5."""
    fit(
        model_blowing_up_above(100.0, "inf_scale"),
        delta_guide,
        num_steps=1,
        optim=pyro.optim.SGD({"lr": 1.0}),
        clip_norm=0.5,
        progress=False,
    )
    assert pyro.param("loc").item() == pytest.approx(0.5, abs=1e-5)


# -- structure and data checks --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Found vars in model but not guide")
def test_a_model_whose_sites_change_is_an_error():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if len(x) > 3:
            mu = mu + pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    data = [(torch.zeros(3),), (torch.zeros(5),)]
    with pytest.raises(ModelStructureError, match=r"changed at step 2: new or changed \['shift'\]"):
        fit(model, AutoNormal(model), data=data, epochs=1, progress=False)


@pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model")
def test_a_guide_with_sites_the_model_lacks_is_an_error():
    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelStructureError, match=r"guide sites not in the model \['extra'\]"):
        fit(normal_model, guide, torch.zeros(3), num_steps=2, progress=False)


def test_auxiliary_guide_sites_are_allowed():
    def guide(x):
        u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)) + 0 * u, 1.0))

    history = fit(normal_model, guide, torch.zeros(3), num_steps=3, progress=False)
    assert history.steps == 3


def test_nan_in_data_is_refused_with_its_index():
    x = torch.zeros(4, 3)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"argument 0 of batch 1 of data.*nan at index \(2, 1\)"):
        fit(normal_model, AutoNormal(normal_model), data=[(torch.zeros(4),), (x,)], epochs=1, progress=False)


# -- data loaders, schedules, validation, callbacks, progress -------------------------------------


def test_epochs_over_a_dataloader():
    x = torch.randn(50, generator=torch.Generator().manual_seed(4))
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True)
    history = fit(normal_model, AutoNormal(normal_model), data=loader, epochs=3, progress=False)
    assert history.steps == 3 * len(loader) == 12
    for epoch in range(3):
        losses = history.loss[4 * epoch : 4 * (epoch + 1)]
        assert history.epoch_loss[epoch] == pytest.approx(sum(losses) / 4)


def test_dict_batches_are_keyword_arguments():
    history = fit(
        normal_model,
        AutoNormal(normal_model),
        data=[{"x": torch.ones(3)}, {"x": torch.zeros(2)}],
        num_steps=5,
        progress=False,
    )
    assert history.steps == 5


@pytest.mark.parametrize(("epochs", "expected_steps_of_decay"), [(None, 6), (3, 3)])
def test_a_scheduler_steps_per_step_or_per_epoch(epochs, expected_steps_of_decay):
    optim = pyro.optim.ExponentialLR({"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "gamma": 0.5})
    data = [(torch.ones(3),), (torch.zeros(3),)]
    if epochs is None:
        fit(normal_model, AutoNormal(normal_model), data=data, num_steps=6, optim=optim, progress=False)
    else:
        fit(normal_model, AutoNormal(normal_model), data=data, epochs=epochs, optim=optim, progress=False)
    for scheduler in optim.optim_objs.values():
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**expected_steps_of_decay)


def test_early_stopping_restores_the_best_parameters():
    """Training data at +3 and validation data at -3: the validation loss only gets worse."""
    snapshots = {}
    history = fit(
        normal_model,
        AutoNormal(normal_model),
        torch.full((20,), 3.0),
        num_steps=1000,
        optim=pyro.optim.Adam({"lr": 0.05}),
        val_data=[(torch.full((20,), -3.0),)],
        val_every=10,
        patience=3,
        callbacks=[snapshot_each_step(snapshots)],
        progress=False,
    )
    assert history.stopped_early and history.best_step == 10
    assert history.steps == 40 and history.val_step == [10, 20, 30, 40]
    assert history.best_val_loss == min(history.val_loss) == history.val_loss[0]
    for name, value in param_values().items():
        assert torch.equal(value, snapshots[10][name])


def test_early_stopping_waits_for_the_end_of_the_warmup():
    history = fit(
        normal_model,
        AutoNormal(normal_model),
        torch.full((20,), 3.0),
        num_steps=1000,
        optim=pyro.optim.Adam({"lr": 0.05}),
        kl_warmup=30,
        val_data=[(torch.full((20,), -3.0),)],
        val_every=10,
        patience=2,
        progress=False,
    )
    assert history.best_step == 30 and history.steps == 50


def test_a_callback_sees_the_history_and_can_stop():
    seen = []

    def callback(history):
        seen.append((history.steps, history.loss[-1]))
        return history.steps == 7

    history = fit(normal_model, AutoNormal(normal_model), torch.zeros(3), num_steps=100, callbacks=[callback])
    assert history.steps == 7 and [s for s, _ in seen] == list(range(1, 8))
    assert [loss for _, loss in seen] == history.loss


def test_the_progress_bar_shows_the_loss_when_asked(capsys):
    fit(normal_model, AutoNormal(normal_model), torch.zeros(3), num_steps=20, log_every=5)
    assert capsys.readouterr().err == ""  # not a terminal under pytest: no bar
    fit(normal_model, AutoNormal(normal_model), torch.zeros(3), num_steps=20, log_every=5, progress=True)
    err = capsys.readouterr().err
    assert "20/20" in err and "loss=" in err


def test_nonfinite_loss_error_survives_pickling():
    """A worker process pickles the error to its parent; the message and the details must arrive."""
    error = NonFiniteLossError("step 3 is not finite", 3, ["AutoFlowGuide.loc"], ["model site 'x': nan"])
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is NonFiniteLossError and str(copy) == "step 3 is not finite"
    assert (copy.step, copy.params, copy.sites) == (3, ["AutoFlowGuide.loc"], ["model site 'x': nan"])


@pytest.mark.filterwarnings("ignore:Encountered")
def test_nonfinite_step_over_data_sets_names_the_site():
    """With a loss over data sets, the failed step's sites are replayed for all data sets at once."""

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        scale = torch.where(y.abs() > 100, torch.tensor(math.inf), torch.tensor(1.0))
        with pyro.plate("obs", y.shape[-1]):
            pyro.sample("y", dist.Normal(mu.unsqueeze(-1), scale), obs=y)

    guide = AutoFlowGuide(model, flow="planar", num_flows=1, summary=DataSummary(inputs=lambda y: y))
    data = DatasetLoader([{"y": torch.tensor([0.5, 0.2])}, {"y": torch.tensor([1000.0, 0.0])}], 2)
    named = r"step 1 is not finite: the loss is nan; model site 'y' has a non-finite log-density"
    with pytest.raises(NonFiniteLossError, match=named):
        fit(model, guide, data=data, epochs=1, loss=DatasetELBO(), progress=False)
