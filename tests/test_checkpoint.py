"""Checkpoints: weights_only files, atomic writes, clear errors, and bit-for-bit resumption of fit."""

import os
import random
import zipfile

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch.utils.data import DataLoader, TensorDataset

from pyro_flowguides import checkpoint as checkpoint_module
from pyro_flowguides.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pyro_flowguides.guide import AutoFlowGuide
from pyro_flowguides.training import fit

X = torch.randn(24, generator=torch.Generator().manual_seed(0)) + 1.5


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, sigma), obs=x)


def other_model(x):
    nu = pyro.sample("nu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(nu, 1.0), obs=x)


def param_values():
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def trained_store(path, steps=5):
    """A guide trained a few steps with Adam, checkpointed at ``path``; returns the optimizer."""
    optim = pyro.optim.Adam({"lr": 0.05})
    fit(
        model,
        AutoFlowGuide(model, flow="planar", num_flows=2),
        X,
        num_steps=steps,
        optim=optim,
        progress=False,
    )
    save_checkpoint(path, optim, step=steps, extra={"note": "five steps"})
    return optim


# -- the file -------------------------------------------------------------------------------------


def test_a_checkpoint_restores_parameters_optimizer_and_generators(tmp_path):
    path = tmp_path / "run.pt"
    optim = trained_store(path)
    saved_params, saved_optim = param_values(), optim.get_state()
    draws = (torch.rand(3), random.random(), np.random.rand())

    pyro.clear_param_store()
    fresh_optim = pyro.optim.Adam({"lr": 0.05})
    guide = AutoFlowGuide(model, flow="planar", num_flows=2)
    guide(X)  # creates the parameters, at other values
    assert any(not torch.equal(param_values()[k], v) for k, v in saved_params.items())
    loaded = load_checkpoint(path, fresh_optim)

    assert loaded.step == 5 and loaded.extra == {"note": "five steps"}
    for name, value in param_values().items():
        assert torch.equal(value, saved_params[name])
    assert torch.equal(torch.rand(3), draws[0]) and (random.random(), np.random.rand()) == draws[1:]
    # the optimizer state is handed over as each parameter's torch optimizer is created
    fresh_optim([p for _, p in pyro.get_param_store().named_parameters()])
    for name, state in fresh_optim.get_state().items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["state"][0][key], saved_optim[name]["state"][0][key])


def test_a_checkpoint_is_read_with_weights_only(tmp_path):
    path = tmp_path / "run.pt"
    trained_store(path)
    contents = torch.load(path, weights_only=True)
    assert contents["format"] == "pyro_flowguides.checkpoint" and contents["step"] == 5
    assert all(isinstance(v, torch.Tensor) for v in contents["params"].values())


def test_extra_entries_that_weights_only_would_refuse_are_an_error_when_saving(tmp_path):
    path = tmp_path / "run.pt"
    trained_store(path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"entry contents\['extra'\]\['where'\] is a PosixPath"):
        save_checkpoint(path, extra={"where": tmp_path})
    assert path.read_bytes() == before


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    trained_store(path)
    before = path.read_bytes()

    def crash_halfway(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, step=6)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert read_checkpoint(path).step == 5


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], r"truncated or corrupted and was not loaded"),
        (lambda b: b[:100] + bytes(200) + b[300:], r"truncated or corrupted and was not loaded"),
        (lambda b: b"", r"truncated or corrupted and was not loaded"),
    ],
    ids=["truncated", "overwritten", "empty"],
)
def test_a_damaged_file_is_a_clear_error_and_changes_nothing(tmp_path, damage, message):
    path = tmp_path / "run.pt"
    trained_store(path)
    before = param_values()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value) and "nothing was changed" in str(raised.value)
    for name, value in param_values().items():
        assert torch.equal(value, before[name])


def test_damage_inside_tensor_data_is_caught_by_the_checksum(tmp_path):
    """torch.load itself reads a flipped byte in a tensor's storage without complaint."""
    path = tmp_path / "run.pt"
    trained_store(path)
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        data = archive.read(entry)
    raw = bytearray(path.read_bytes())
    start = raw.index(data, entry.header_offset)
    raw[start + len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    torch.load(path, weights_only=True)  # loads, with a wrong value
    with pytest.raises(CheckpointError, match=r"corrupted.*do not match the checksum"):
        read_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (print, ("this would run on loading",))


def test_a_file_holding_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "pyro_flowguides.checkpoint", "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*could run code"):
        read_checkpoint(path)


def test_a_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"not a pyro_flowguides checkpoint"):
        read_checkpoint(path)


def test_a_checkpoint_of_another_model_is_refused_and_changes_nothing(tmp_path):
    path = tmp_path / "run.pt"
    trained_store(path)
    pyro.clear_param_store()
    AutoFlowGuide(other_model, flow="planar", num_flows=2)(X)
    before = param_values()
    with pytest.raises(
        CheckpointMismatchError, match=r"saved from another model or guide: .*shape \(2,\).*\(1,\)"
    ):
        load_checkpoint(path)
    for name, value in param_values().items():
        assert torch.equal(value, before[name])


def test_loading_into_an_empty_store_says_what_to_do(tmp_path):
    path = tmp_path / "run.pt"
    trained_store(path)
    pyro.clear_param_store()
    with pytest.raises(CheckpointMismatchError, match=r"param store is empty.*guide\(\*args\)"):
        load_checkpoint(path)


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "nothing.pt")


# -- resuming fit ---------------------------------------------------------------------------------


def run_steps(num_steps, **options):
    """A fresh guide and optimizer (as in a new process), then fit."""
    pyro.clear_param_store()
    guide = AutoFlowGuide(model, flow="planar", num_flows=3)
    optim = pyro.optim.Adam({"lr": 0.03})
    history = fit(model, guide, X, num_steps=num_steps, optim=optim, progress=False, **options)
    return history, param_values()


def test_resuming_gives_the_same_losses_bit_for_bit(tmp_path):
    pyro.set_rng_seed(1)
    full, full_params = run_steps(20)

    pyro.set_rng_seed(1)
    path = tmp_path / "run.pt"
    first, _ = run_steps(10, checkpoint=path)
    pyro.set_rng_seed(12345)  # whatever happens in between
    resumed, resumed_params = run_steps(20, resume_from=path)

    assert first.loss == full.loss[:10]
    assert resumed.loss == full.loss  # floats compared exactly
    for name, value in full_params.items():
        assert torch.equal(resumed_params[name], value)


def test_ctrl_c_leaves_a_checkpoint_to_resume_from(tmp_path):
    pyro.set_rng_seed(2)
    full, full_params = run_steps(15)

    def interrupt_at_step_7(history):
        if history.steps == 7:
            raise KeyboardInterrupt

    pyro.set_rng_seed(2)
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run_steps(15, checkpoint=path, callbacks=[interrupt_at_step_7])
    assert read_checkpoint(path).step == 7
    resumed, resumed_params = run_steps(15, resume_from=path)
    assert resumed.loss == full.loss
    for name, value in full_params.items():
        assert torch.equal(resumed_params[name], value)


def test_resuming_inside_an_epoch_of_a_shuffled_loader(tmp_path):
    """Checkpoints every 3 steps over 4 batches an epoch: the one resumed from lies inside epoch 2,
    with warm-up, validation and early-stopping state to carry over."""
    loader = DataLoader(TensorDataset(X), batch_size=6, shuffle=True)

    def run(**options):
        pyro.clear_param_store()
        guide = AutoNormal(model)
        return fit(
            model,
            guide,
            data=loader,
            epochs=4,
            optim=pyro.optim.Adam({"lr": 0.05}),
            kl_warmup=2,
            val_data=[(X[:8],)],
            val_every=2,
            patience=50,
            progress=False,
            **options,
        ), param_values()

    pyro.set_rng_seed(3)
    full, full_params = run()

    def interrupt_at_step_11(history):
        if history.steps == 11:
            raise KeyboardInterrupt

    pyro.set_rng_seed(3)
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=path, checkpoint_every=3, callbacks=[interrupt_at_step_11])
    saved = read_checkpoint(path)
    assert saved.step == 11 and saved.extra["epoch"] == 2 and saved.extra["batch_in_epoch"] == 3
    resumed, resumed_params = run(resume_from=path)
    assert resumed.loss == full.loss and resumed.val_loss == full.val_loss
    assert resumed.epoch_loss == full.epoch_loss and resumed.best_step == full.best_step
    for name, value in full_params.items():
        assert torch.equal(resumed_params[name], value)


def test_resuming_with_another_model_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    run_steps(3, checkpoint=path)
    pyro.clear_param_store()
    with pytest.raises(CheckpointMismatchError, match=r"sample sites \['mu', 'sigma', 'x'\].*\['nu', 'x'\]"):
        fit(other_model, AutoNormal(other_model), X, num_steps=5, resume_from=path, progress=False)
