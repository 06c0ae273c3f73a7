"""Hugging Face support: per-example gradients of a GPT-2 (Conv1D, tied embeddings, a position
embedding broadcast over the batch) by layer hooks against plain autograd; a Trainer run recorded by
PlgkCallback against the same run as a plain torch loop recorded by the Recorder (bit-identical
step files, equal influence matrices, replay's update check passing); one-line refusals.

Everything is built from a local config: nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.func import functional_call

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from plgk_cli.arguments import ReplayArguments  # noqa: E402
from plgk_cli.data import load_dataset  # noqa: E402
from plgk_cli.errors import ConfigError, PlgkError, RecorderError  # noqa: E402
from plgk_cli.gradients import GradientComputer, ParameterLayout  # noqa: E402
from plgk_cli.hf import PlgkCallback, causal_lm  # noqa: E402
from plgk_cli.models import build_model  # noqa: E402
from plgk_cli.recorder import Recorder  # noqa: E402
from plgk_cli.replay import replay  # noqa: E402
from plgk_cli.store import InfluenceFile  # noqa: E402
from plgk_cli.tasks import task_for  # noqa: E402

TASK = task_for("language-model")
SEED, BATCH, STEPS = 0, 16, 5


def gpt2_config(vocab, positions, width, dropout):
    return {"model_type": "gpt2", "n_layer": 2, "n_embd": width, "n_head": 2, "vocab_size": vocab,
            "n_positions": positions, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
            "bos_token_id": 0, "eos_token_id": 0}


# ---------------------------------------------------------------- per-example gradients


def _tiny(dropout, vocab=23, length=7):
    torch.manual_seed(1)
    model = causal_lm((length,), vocab, gpt2_config(vocab, 9, 16, dropout)).to(torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, vocab, (5, length), generator=g)
    y = torch.cat([x[:, 1:], torch.full((5, 1), -100)], 1)
    y[3, 4:] = -100  # a right-padded sequence: fewer targets, the token-weighted loss sees it
    layout = ParameterLayout.of(model)
    theta = layout.flatten(dict(model.named_parameters()))
    return model, layout, theta, x, y


def _autograd(model, layout, theta, x, y, row, rng=None):
    """∂ℓ_row/∂θ by plain autograd: in eval mode of the one example, or (rng given) of the row's
    loss term within the whole batch's training forward from that random state."""
    theta = theta.clone().requires_grad_(True)
    if rng is None:
        model.eval()
        terms = TASK.loss_terms(functional_call(model, layout.unflatten(theta), (x[row:row + 1],)), y[row:row + 1])
        (g,) = torch.autograd.grad(terms[0], theta)
        return g
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        terms = TASK.loss_terms(functional_call(model, layout.unflatten(theta), (x,)), y)
    (g,) = torch.autograd.grad(terms[row], theta)
    return g


def test_gpt2_per_example_gradients_by_hooks_equal_autograd():
    """Audit side (eval mode, dropout 0): Conv1D's rule, the tied wte/lm_head weight (the sum of
    the lookup's and the head's gradients) and the (1, T) position lookup expanded to the batch."""
    model, layout, theta, x, y = _tiny(dropout=0.0)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: listed once
    assert "lm_head.weight" not in layout.names
    grads = GradientComputer(model, layout, 23, task=TASK, label_shape=(x.shape[1],))
    assert grads.method == "hooks"
    values, g = grads.audit_gradients(theta, x, y, ("loss",))
    assert grads.method == "hooks"  # the first comparison with autograd kept hooks
    wte = dict(layout.layers)["transformer.wte"]
    for i in range(len(x)):
        expected = _autograd(model, layout, theta, x, y, i)
        torch.testing.assert_close(g[i, 0], expected, rtol=1e-10, atol=1e-13)
        # rows of tokens the example never looks up get the head's share alone, and it is not
        # zero: a pass that kept only the lookup's share (or only the head's) would fail above
        absent = torch.ones(23, dtype=torch.bool)
        absent[x[i]] = False
        assert expected[wte].view(23, -1)[absent].abs().max() > 1e-4
    with torch.no_grad():  # what the hooks' forward gave is the model's own loss
        model.eval()
        torch.testing.assert_close(values[:, 0], TASK.loss_terms(model(x), y))


def test_gpt2_training_pass_with_dropout_by_hooks_equals_autograd():
    """Training side: dropout 0.1 from a recorded random state, each example's loss term within
    its batch, by the layers' rules (the comparison on the same graph keeps them)."""
    model, layout, theta, x, y = _tiny(dropout=0.1)
    grads = GradientComputer(model, layout, 23, task=TASK, label_shape=(x.shape[1],))
    rng = torch.Generator().manual_seed(5).get_state()
    rows = torch.arange(len(x))
    out = torch.empty(len(x), layout.size, dtype=torch.float64)
    result = grads.training_pass(theta, x, y, {"cpu": rng}, {}, rows, out)
    assert grads._training_hooks is True and grads.method == "hooks"
    for i in range(len(x)):
        torch.testing.assert_close(out[i], _autograd(model, layout, theta, x, y, i, rng), rtol=1e-10, atol=1e-13)
    # the batch gradient is the weighted sum of the terms' (token-weighted mean)
    weights = TASK.weights(y).to(out.dtype)
    torch.testing.assert_close(result.batch_grad, weights @ out, rtol=1e-10, atol=1e-13)
    # dropout changed the forward: the eval-mode gradients differ from these
    assert (out[0] - _autograd(model, layout, theta, x, y, 0)).abs().max() > 1e-6


# ---------------------------------------------------------------- Trainer vs plain loop


@pytest.fixture(scope="module")
def lm_data():
    # the addition corpus (10 byte tokens per row); subsets of its rows keep the tests quick
    return load_dataset("addition", 0, torch.float32, TASK)


def _subset_npz(tmp_path, data, rows):
    path = tmp_path / "addition.npz"
    train, test = data.x_train[:rows].numpy(), data.x_train[rows:rows + 24].numpy()
    # token 0 is the corpus's right padding (its text never holds a NUL byte)
    np.savez(path, ids_train=train, ids_test=test, mask_train=train != 0, mask_test=test != 0)
    return f"npz:{path}"


def _args(out, **changes):
    kwargs = dict(output_dir=str(out), optim="adamw_torch", learning_rate=3e-3, weight_decay=0.01,
                  lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=0.5, seed=SEED,
                  max_steps=STEPS, per_device_train_batch_size=BATCH, report_to="none", save_strategy="no",
                  logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    kwargs.update(changes)
    return transformers.TrainingArguments(**kwargs)


def trainer_run(tmp_path, spec, config):
    data = load_dataset(spec, 0, torch.float32, TASK)
    torch.manual_seed(SEED)
    model = causal_lm(data.in_shape, data.num_classes, config)
    callback = PlgkCallback(tmp_path / "trainer", spec, model_kwargs={"config": config})
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "hf"),
                                   train_dataset=callback.train_dataset, callbacks=[callback])
    trainer.train()
    return tmp_path / "trainer", trainer


def plain_run(tmp_path, spec, config, args):
    """The same run as an ordinary torch loop: the seed, the model, the seed again (as the
    Trainer's set_seed), AdamW over the Trainer's two groups (no decay for biases and LayerNorm),
    HF's cosine schedule with warmup, shuffled minibatches from a DataLoader whose sampler is
    seeded by the seed (as accelerate's seedable sampler), the task's batch loss, clipping by the
    Recorder."""
    data = load_dataset(spec, 0, torch.float32, TASK)
    torch.manual_seed(SEED)
    model = causal_lm(data.in_shape, data.num_classes, config)
    torch.manual_seed(SEED)
    no_decay = [n for n, p in model.named_parameters() if "bias" in n or ".ln_" in n]
    groups = [{"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-3)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, 2, STEPS)
    m = len(data.y_train)
    sampler = torch.utils.data.RandomSampler(range(m), generator=torch.Generator().manual_seed(SEED))
    loader = torch.utils.data.DataLoader(torch.arange(m), batch_size=BATCH, sampler=sampler)
    model.train()
    with Recorder(tmp_path / "plain", model, optimizer, model_name="plgk_cli.hf:causal_lm",
                  model_kwargs={"config": config}, dataset=spec, batch_size=BATCH, epochs=1,
                  task=TASK) as recorder:
        for batch in loader:
            optimizer.zero_grad()
            loss = TASK.batch_loss(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            recorder.clip_grad_norm(0.5)
            optimizer.step()
            scheduler.step()
            recorder.step(batch, loss)
            if recorder.step_count == STEPS:
                break
    return tmp_path / "plain"


def _step_files(run):
    return sorted(p.name for p in run.glob("step_*.safetensors"))


def test_trainer_run_recorded_by_the_callback_equals_a_plain_loop(tmp_path, lm_data):
    spec = _subset_npz(tmp_path, lm_data, 160)
    config = gpt2_config(lm_data.num_classes, 10, 32, dropout=0.1)
    recorded, trainer = trainer_run(tmp_path, spec, config)
    plain = plain_run(tmp_path, spec, config, trainer.args)
    assert trainer.args.max_grad_norm == 0.5  # the callback gave the user's value back

    files = _step_files(recorded)
    assert files == _step_files(plain) and len(files) == STEPS + 1
    clipped = []
    for name in files:  # every tensor of every step file, bit for bit
        a, b = load_file(recorded / name), load_file(plain / name)
        assert sorted(a) == sorted(b), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        with safe_open(recorded / name, "pt") as fa, safe_open(plain / name, "pt") as fb:
            ma, mb = fa.metadata(), fb.metadata()
        assert {k: v for k, v in ma.items() if k != "run_id"} == {k: v for k, v in mb.items() if k != "run_id"}
        if name != files[0]:
            assert "rng/cpu" in a  # dropout: each forward's random state is recorded
            clipped.append(float(a["clip_coef"]))
    assert min(clipped) < 1.0  # max_grad_norm 0.5 clipped: the callback's clipping was recorded

    out = {}
    for run in (recorded, plain):
        out[run.name] = tmp_path / f"{run.name}.h5"
        summary = replay(ReplayArguments(ckpts=str(run), audit_set="test[:8]", out=str(out[run.name]),
                                         device="cpu"), progress=False)
        assert summary.steps == STEPS
        assert summary.max_update_error <= 1e-5, summary.max_update_error
    with InfluenceFile(out["trainer"]) as fa, InfluenceFile(out["plain"]) as fb:
        influence = fa.influence("loss")
        assert np.abs(influence).max() > 1e-4  # the audit found something to compare
        assert np.array_equal(influence, fb.influence("loss"))
        assert np.array_equal(fa.update_error, fb.update_error)
        print(f"update errors {summary.max_update_error:.3g}, max |influence| {np.abs(influence).max():.3g}")


# ---------------------------------------------------------------- refusals, one line each


def _one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2"])
def test_a_hub_name_is_refused_without_downloading(name):
    with pytest.raises(ConfigError) as exc:
        build_model("plgk_cli.hf:causal_lm", {"config": name}, (10,), 62)
    message = _one_line(exc)
    assert "never downloads" in message and "local" in message


@pytest.mark.parametrize("change,expected", [
    ({"vocab_size": 20}, "vocab_size 20 is smaller"), ({"n_positions": 8}, "shorter than the data's sequences"),
    ({"n_layers": 2}, "'n_layers' not known"), ({"model_type": "no-such-model"}, "unknown model_type")])
def test_a_config_that_does_not_fit_is_refused(change, expected):
    config = {**gpt2_config(62, 10, 16, 0.0), **change}
    with pytest.raises(ConfigError) as exc:
        build_model("plgk_cli.hf:causal_lm", {"config": config}, (10,), 62)
    assert expected in _one_line(exc)


def test_a_local_config_directory_builds_the_same_model(tmp_path):
    config = gpt2_config(62, 10, 16, 0.0)
    transformers.AutoConfig.for_model(**config).save_pretrained(tmp_path / "cfg")
    torch.manual_seed(3)
    a = causal_lm((10,), 62, config)
    torch.manual_seed(3)
    b = causal_lm((10,), 62, str(tmp_path / "cfg"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("change,expected", [
    ({"optim": "adamw_torch_fused"}, "use optim='adamw_torch'"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0"),
    ({"bf16": True}, "mixed precision"), ({"fp16": True}, "mixed precision"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=1 and a larger per_device_train_batch_size")])
def test_a_trainer_replay_cannot_model_is_refused_before_training(tmp_path, lm_data, change, expected):
    spec = _subset_npz(tmp_path, lm_data, 32)
    config = gpt2_config(lm_data.num_classes, 10, 16, 0.1)
    torch.manual_seed(SEED)
    model = causal_lm((10,), lm_data.num_classes, config)
    callback = PlgkCallback(tmp_path / "run", spec, model_kwargs={"config": config})
    with pytest.raises(RecorderError) as exc:
        transformers.Trainer(model=model, args=_args(tmp_path / "hf", **change),
                             train_dataset=callback.train_dataset, callbacks=[callback])
    assert expected in _one_line(exc)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_other_training_data_and_another_model_are_refused(tmp_path, lm_data):
    spec = _subset_npz(tmp_path, lm_data, 32)
    config = gpt2_config(lm_data.num_classes, 10, 16, 0.0)
    torch.manual_seed(SEED)
    model = causal_lm((10,), lm_data.num_classes, config)
    callback = PlgkCallback(tmp_path / "a", spec, model_kwargs={"config": config})
    other = torch.utils.data.Subset(callback.train_dataset, range(16))
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "hf"), train_dataset=other,
                                   callbacks=[callback])
    with pytest.raises(RecorderError) as exc:
        trainer.train()
    assert "callback.train_dataset" in _one_line(exc)

    callback = PlgkCallback(tmp_path / "c", spec, model_kwargs={"config": config})
    trainer = transformers.Trainer(model=model.double(), args=_args(tmp_path / "hf"),
                                   train_dataset=callback.train_dataset, callbacks=[callback])
    with pytest.raises(RecorderError) as exc:  # HF's loss computes float64 logits in float32
        trainer.train()
    assert "record a float32 model" in _one_line(exc)
    model.float()

    wider = {**config, "n_embd": 32}  # replay would rebuild another model from these kwargs
    callback = PlgkCallback(tmp_path / "b", spec, model_kwargs={"config": wider})
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "hf"), train_dataset=callback.train_dataset,
                                   callbacks=[callback])
    with pytest.raises(PlgkError) as exc:
        trainer.train()
    assert "must match" in _one_line(exc)


def test_plgk_train_and_replay_a_causal_lm_from_the_config_file(tmp_path):
    import json

    from test_cli_errors import invoke

    ids = np.random.default_rng(0).integers(1, 20, size=(24, 8))
    np.savez(tmp_path / "ids.npz", ids_train=ids, ids_test=ids[:4])
    config = json.dumps(gpt2_config(20, 8, 16, 0.1)).replace('":', '" =').replace("{", "{ ").replace("}", " }")
    (tmp_path / "run.toml").write_text(f"""
[task]
name = "language-model"
[data]
dataset = "npz:{tmp_path / 'ids.npz'}"
[model]
name = "plgk_cli.hf:causal_lm"
kwargs = {{ config = {config} }}
[optim]
name = "adamw"
lr = 1e-3
[train]
epochs = 1
batch_size = 8
""")
    result = invoke("train", "--config", tmp_path / "run.toml", "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("replay", "--ckpts", tmp_path / "run", "--audit-set", "test[:4]", "--out", tmp_path / "o.h5",
                    "--quiet")
    assert result.exit_code == 0, result.output
    with InfluenceFile(tmp_path / "o.h5") as f:
        assert f.metrics("loss")["max_update_error"] <= 1e-5 and f.metrics("loss")["lc"] > 0.999


def test_config_values_transformers_refuses_are_one_line():
    config = {**gpt2_config(62, 10, 16, 0.0), "n_layer": "x"}
    with pytest.raises(ConfigError) as exc:
        build_model("plgk_cli.hf:causal_lm", {"config": config}, (10,), 62)
    assert "GPT2Config refused the values" in _one_line(exc)
