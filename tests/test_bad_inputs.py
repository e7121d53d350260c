"""A table of bad inputs: each is refused with an error of the right type that names what is wrong."""

import inspect
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_flowguides import flows
from pyro_flowguides.checkpoint import CheckpointError, CheckpointMismatchError, save_checkpoint
from pyro_flowguides.guide import AutoFlowGuide
from pyro_flowguides.training import ModelStructureError, fit

N = 20


def gaussian(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", N):
        pyro.sample("x", dist.Normal(mu, sigma), obs=x)


def logistic(y):
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N):
        pyro.sample("y", dist.Bernoulli(logits=b), obs=y)


def fit_quietly(model, guide, *args, **options):
    options.setdefault("num_steps", None if "data" in options else 3)
    return fit(model, guide, *args, progress=False, **options)


X = torch.randn(N)
Y = (torch.arange(N) % 2).float()


def with_nan(x, index):
    x = x.clone()
    x[index] = math.nan
    return x


# -- cases: each a function that should raise --------------------------------------------------


def observations_of_the_wrong_shape():
    fit_quietly(gaussian, AutoNormal(gaussian), X[:, None])


def observations_of_the_wrong_dtype():
    fit_quietly(logistic, AutoNormal(logistic), Y.long())


def observations_outside_the_support():
    fit_quietly(logistic, AutoNormal(logistic), Y * 2)


def nan_in_observations():
    fit_quietly(gaussian, AutoNormal(gaussian), with_nan(X, 7))


def inf_in_validation_data():
    x_val = X.clone()
    x_val[3] = math.inf
    fit_quietly(gaussian, AutoNormal(gaussian), X, val_data=[(x_val,)], val_every=1)


def nan_in_a_later_batch():
    fit_quietly(gaussian, AutoNormal(gaussian), data=[(X,), (with_nan(X, 11),)], epochs=1)


def a_tensor_instead_of_batches():
    fit_quietly(gaussian, AutoNormal(gaussian), data=X, epochs=1)


def a_batch_that_is_not_arguments():
    fit_quietly(gaussian, AutoNormal(gaussian), data=["not a tensor"], epochs=1)


def a_context_of_the_wrong_size():
    flows.make("planar", 3, context_dim=5).condition(torch.zeros(4, 6))


def an_input_of_the_wrong_size():
    flows.make("planar", 3)(torch.zeros(4, 2))


def a_discrete_latent():
    def model():
        pyro.sample("k", dist.Bernoulli(0.5))

    fit_quietly(model, AutoFlowGuide(model))


def an_unknown_flow_name():
    AutoFlowGuide(gaussian, flow="plannar")


def no_flow_layers():
    AutoFlowGuide(gaussian, flow="planar", num_flows=0)


def a_bottleneck_larger_than_the_dimension():
    fit_quietly(gaussian, AutoFlowGuide(gaussian, flow="generalized_planar", bottleneck=5), X)


def an_unknown_layer_option():
    flows.make("planar", 3, colour="red")


def a_non_positive_init_scale():
    AutoFlowGuide(gaussian, init_scale=0.0)


def a_model_whose_structure_changes():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if x.sum() > 0:  # a branch on the data
            mu = mu + pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    fit_quietly(model, AutoNormal(model), data=[(-X.abs(),), (X.abs(),)], epochs=1)


def a_guide_with_a_site_the_model_lacks():
    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
        pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        pyro.sample("tau", dist.LogNormal(0.0, 1.0))

    fit_quietly(gaussian, guide, X)


def a_checkpoint_from_another_model(tmp_path):
    fit_quietly(logistic, AutoNormal(logistic), Y, checkpoint=tmp_path / "run.pt")
    pyro.clear_param_store()
    fit_quietly(gaussian, AutoNormal(gaussian), X, resume_from=tmp_path / "run.pt")


def a_checkpoint_with_other_parameter_shapes(tmp_path):
    fit_quietly(
        gaussian, AutoFlowGuide(gaussian, flow="planar", num_flows=2), X, checkpoint=tmp_path / "run.pt"
    )
    pyro.clear_param_store()
    fit_quietly(
        gaussian, AutoFlowGuide(gaussian, flow="planar", num_flows=3), X, resume_from=tmp_path / "run.pt"
    )


def a_truncated_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    fit_quietly(gaussian, AutoNormal(gaussian), X)
    save_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-200])
    fit_quietly(gaussian, AutoNormal(gaussian), X, resume_from=path)


def zero_steps():
    fit_quietly(gaussian, AutoNormal(gaussian), X, num_steps=0)


def epochs_without_data():
    fit_quietly(gaussian, AutoNormal(gaussian), X, num_steps=None, epochs=3)


def a_torch_optimizer():
    fit_quietly(gaussian, AutoNormal(gaussian), X, optim=torch.optim.Adam)


def an_unknown_nonfinite_policy():
    fit_quietly(gaussian, AutoNormal(gaussian), X, on_nonfinite="skip")


def early_stopping_without_validation_data():
    fit_quietly(gaussian, AutoNormal(gaussian), X, patience=5)


def checkpoints_without_a_path():
    fit_quietly(gaussian, AutoNormal(gaussian), X, checkpoint_every=10)


def a_negative_clip_norm():
    fit_quietly(gaussian, AutoNormal(gaussian), X, clip_norm=-1.0)


def positional_arguments_with_data():
    fit_quietly(gaussian, AutoNormal(gaussian), X, data=[(X,)], epochs=1)


CASES = [
    (observations_of_the_wrong_shape, ValueError, r"observed site 'x': data of shape \(20, 1\).*\(20,\)"),
    (observations_of_the_wrong_dtype, ValueError, r"observed site 'y': Bernoulli cannot score.*torch\.int64"),
    (observations_outside_the_support, ValueError, r"observed site 'y': Bernoulli cannot score.*support"),
    (nan_in_observations, ValueError, r"argument 0 of fit's arguments holds nan at index \(7,\)"),
    (inf_in_validation_data, ValueError, r"argument 0 of batch 0 of val_data holds inf at index \(3,\)"),
    (nan_in_a_later_batch, ValueError, r"batch 1 of data \(epoch 0\) holds nan at index \(11,\)"),
    (a_tensor_instead_of_batches, TypeError, r"data must be an iterable of batches.*data=\[\(x, y\)\]"),
    (a_batch_that_is_not_arguments, TypeError, r"batch 0 of data \(epoch 0\) is a str"),
    (a_context_of_the_wrong_size, ValueError, r"context with last dimension 5, got shape \(4, 6\)"),
    (an_input_of_the_wrong_size, ValueError, r"input with last dimension 3, got shape \(4, 2\)"),
    (a_discrete_latent, ValueError, r"'k'.*discrete|discrete.*'k'"),
    (an_unknown_flow_name, ValueError, r"unknown flow layer 'plannar'; available: .*planar"),
    (no_flow_layers, ValueError, r"num_flows must be an integer >= 1, got 0"),
    (a_bottleneck_larger_than_the_dimension, ValueError, r"bottleneck=5 is larger than the dimension 2"),
    (an_unknown_layer_option, ValueError, r"unknown option\(s\) colour; options it takes"),
    (a_non_positive_init_scale, ValueError, r"init_scale must be a positive number, got 0\.0"),
    (
        a_model_whose_structure_changes,
        ModelStructureError,
        r"sites changed at step 2: new or changed \['shift'\]",
    ),
    (a_guide_with_a_site_the_model_lacks, ModelStructureError, r"guide sites not in the model \['tau'\]"),
    (a_checkpoint_from_another_model, CheckpointMismatchError, r"sample sites \['b', 'y'\].*\['mu', 'sigma'"),
    (
        a_checkpoint_with_other_parameter_shapes,
        CheckpointMismatchError,
        r"another model or guide: .*shape \(2",
    ),
    (a_truncated_checkpoint, CheckpointError, r"run\.pt is truncated or corrupted"),
    (zero_steps, ValueError, r"num_steps must be an integer >= 1, got 0"),
    (epochs_without_data, ValueError, r"epochs counts passes over data"),
    (
        a_torch_optimizer,
        TypeError,
        r"optim must be a Pyro optimizer such as pyro\.optim\.Adam.*got the class torch\.optim\.adam\.Adam",
    ),
    (an_unknown_nonfinite_policy, ValueError, r"on_nonfinite must be 'raise' or 'retry', got 'skip'"),
    (early_stopping_without_validation_data, ValueError, r"patience \(early stopping\) needs .*val_data"),
    (checkpoints_without_a_path, ValueError, r"checkpoint_every needs checkpoint=<path>"),
    (a_negative_clip_norm, ValueError, r"clip_norm must be a finite number > 0, got -1\.0"),
    (positional_arguments_with_data, ValueError, r"with data, each batch holds the model's positional"),
]


@pytest.mark.filterwarnings("ignore:Found")  # Pyro's own warnings about model/guide mismatches
@pytest.mark.parametrize(("case", "error", "message"), CASES, ids=[case.__name__ for case, _, _ in CASES])
def test_a_bad_input_gets_a_clear_error(case, error, message, tmp_path):
    arguments = (tmp_path,) if "tmp_path" in inspect.signature(case).parameters else ()
    with pytest.raises(error, match=message):
        case(*arguments)
