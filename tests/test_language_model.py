"""The language-model task: its loss against Hugging Face's convention written out by hand, its
audited quantities against explicit loops, the token data and prompt audit sets, a recorded and
replayed byte-level GPT with dropout (the update check, completeness), and its bad inputs.
tests/test_language_model_reference.py holds the float64 per-example reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from plgk_cli.arguments import resolve_audit_set
from plgk_cli.config import load_config
from plgk_cli.data import addition_corpus, load_dataset
from plgk_cli.errors import DataError
from plgk_cli.store import InfluenceFile
from plgk_cli.tasks import task_for
from plgk_cli.tasks.language_model import (BOS, IGNORE, decode, encode, next_token_targets,
                                           prompt_points)
from plgk_cli.train import train
from test_cli_errors import assert_nothing_written, assert_one_line_error, invoke

TASK = task_for("language-model")


def random_batch(seed=0, batch=4, length=7, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (batch, length), generator=g)
    y[0, 3:] = IGNORE  # rows with different numbers of targets, one with none
    y[1, :] = IGNORE
    y[2, -1] = IGNORE
    return logits, y


def explicit_token_losses(logits, y):
    losses = torch.zeros(y.shape, dtype=logits.dtype)
    for m in range(y.shape[0]):
        for t in range(y.shape[1]):
            if y[m, t] != IGNORE:
                losses[m, t] = -torch.log_softmax(logits[m, t], 0)[y[m, t]]
    return losses


def test_batch_loss_is_the_token_weighted_mean_and_the_weighted_sum_of_terms():
    logits, y = random_batch()
    losses = explicit_token_losses(logits, y)
    targets = int((y != IGNORE).sum())
    expected = losses.sum() / targets  # Hugging Face: Σ token CE / targets in the batch
    assert torch.allclose(TASK.batch_loss(logits, y), expected, rtol=1e-13)
    w, terms = TASK.weights(y), TASK.loss_terms(logits, y)
    assert torch.allclose((w * terms).sum(), expected, rtol=1e-13)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[1]) == 0 and float(terms[1]) == 0  # no targets: no term, no weight
    counts = (y != IGNORE).sum(1)
    assert torch.allclose(terms[counts > 0], (losses.sum(1) / counts.clamp_min(1))[counts > 0], rtol=1e-13)


def test_batch_loss_equals_transformers_causal_lm_loss():
    transformers = pytest.importorskip("transformers")
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, y = random_batch(seed=1)
    y[:, -1] = IGNORE  # the last position predicts nothing, as in every sequence plgk builds
    # Hugging Face labels are unshifted (position t predicts labels[t + 1]); plgk's y[t] = labels[t + 1].
    labels = torch.full_like(y, IGNORE)
    labels[:, 1:] = y[:, :-1]
    hf = ForCausalLMLoss(logits, labels, vocab_size=11, num_items_in_batch=(labels[:, 1:] != IGNORE).sum())
    assert transformers.__version__  # float32 inside: ForCausalLMLoss upcasts logits with .float()
    assert torch.allclose(TASK.batch_loss(logits, y), hf.to(torch.float64), rtol=1e-6)


def test_audited_quantities_by_explicit_loops():
    logits, y = random_batch(seed=2)
    losses = explicit_token_losses(logits, y)
    values = TASK.audited(logits, y, ("loss", "sequence-logprob", "token-losses"))
    assert values.shape == (4, 2 + 7) and TASK.target_width("token-losses", 11, (7,)) == 7
    assert torch.allclose(values[:, 1], -losses.sum(1), rtol=1e-13)
    assert torch.allclose(values[:, 2:], losses, rtol=1e-13)
    assert torch.allclose(values[:, 0], TASK.loss_terms(logits, y), rtol=1e-13)


def test_next_token_targets_mask_and_byte_tokenizer():
    ids = np.array([[5, 6, 7, 0], [1, 2, 0, 0]])
    mask = ids != 0
    assert next_token_targets(ids, mask).tolist() == [[6, 7, IGNORE, IGNORE], [2, IGNORE, IGNORE, IGNORE]]
    assert encode("ab") == [BOS, 97, 98] and decode(encode("é+1")[1:]) == "é+1"


def test_text_and_npz_datasets(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}\n" for i in range(20)) + "\n")
    data = load_dataset(f"text:{text}", 0, torch.float32, TASK)
    assert len(data.y_train) == 18 and len(data.y_test) == 2 and data.x_train.dtype == torch.int64
    row = data.y_train[0]
    assert decode(row[row != IGNORE]).startswith("line ") and decode(row[row != IGNORE]).endswith("\n")
    lines = {decode(r[r != IGNORE]) for r in torch.cat([data.y_train, data.y_test])}
    assert lines == {f"line {i}\n" for i in range(20)}  # every line once, in one split or the other

    ids = np.array([[3, 4, 5, 0], [6, 7, 0, 0], [1, 2, 3, 4]])
    np.savez(tmp_path / "ids.npz", ids_train=ids, ids_test=ids[:1], mask_train=ids != 0, mask_test=ids[:1] != 0)
    data = load_dataset(f"npz:{tmp_path / 'ids.npz'}", 0, torch.float32, TASK)
    assert data.y_train.tolist() == next_token_targets(ids, ids != 0).tolist()
    assert data.num_classes == 8  # id 7 is the largest, in the inputs as in the targets
    np.savez(tmp_path / "first.npz", ids_train=np.array([[9, 1, 2]]), ids_test=np.array([[1, 2, 3]]))
    assert load_dataset(f"npz:{tmp_path / 'first.npz'}", 0, torch.float32, TASK).num_classes == 10

    np.savez(tmp_path / "left.npz", ids_train=ids, ids_test=ids, mask_train=ids[:, ::-1] != 0,
             mask_test=ids != 0)
    with pytest.raises(DataError, match="padding before real tokens"):
        load_dataset(f"npz:{tmp_path / 'left.npz'}", 0, torch.float32, TASK)


def test_addition_corpus_plants_wrong_answers_next_to_held_out_twins():
    corpus = addition_corpus(0)
    assert len(set(corpus.train) | set(corpus.test)) == len(corpus.train) + len(corpus.test)
    for p, twin in zip(corpus.planted, corpus.twins):
        problem, answer = corpus.train[p].split("=")
        a, b = map(int, problem.split("+"))
        assert int(answer) != a + b and all(x != y for x, y in zip(answer, str(a + b)))
        assert corpus.test[twin] == f"{b}+{a}={a + b}"
    right = [line for i, line in enumerate(corpus.train) if i not in corpus.planted]
    assert all(eval(line.split("=")[0]) == int(line.split("=")[1]) for line in right)


def test_prompt_points_target_the_continuation_only(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "12+3=", "continuation": "15\n"}) + "\n\n"
                    + json.dumps({"prompt": "", "continuation": "7"}) + "\n")
    x, y = prompt_points(path, 10)
    assert x.shape == (2, 10)
    assert decode(y[0][y[0] != IGNORE]) == "15\n" and decode(x[0][:9]) == "\n12+3=15\n"
    assert decode(y[1][y[1] != IGNORE]) == "7"  # an empty prompt: the continuation after BOS
    with pytest.raises(ValueError, match="longer than the context of 5"):
        prompt_points(path, 5)
    path.write_text('{"prompt": "1"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: expected"):
        prompt_points(path, 10)


LM_CONFIG = """
[task]
name = "language-model"
[data]
dataset = "text:{corpus}"
[model]
name = "gpt"
kwargs = {{ vocab = 256, width = 16, heads = 2, layers = 1, dropout = 0.1 }}
[optim]
name = "adamw"
lr = 3e-3
weight_decay = 0.01
clip_grad_norm = 1.0
[schedule]
name = "cosine"
warmup_steps = 2
[train]
epochs = 2
batch_size = 8
seed = 0
device = "cpu"
"""


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    corpus = root / "sums.txt"
    corpus.write_text("".join(f"{a}+{b}={a + b}\n" for a in range(3, 9) for b in range(2, 6)))
    config = root / "run.toml"
    config.write_text(LM_CONFIG.format(corpus=corpus))
    train(load_config(config), root / "run", progress=False)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n"
                               for p, c in (("4+4=", "8\n"), ("7+3=", "10\n"), ("9+9=", "18\n"))))
    return {"root": root, "run": root / "run", "prompts": prompts, "config": config}


def test_recorded_gpt_with_dropout_replays_exactly_and_completely(lm_run, tmp_path):
    out = tmp_path / "lm.h5"
    result = invoke("replay", "--ckpts", lm_run["run"], "--audit-set", lm_run["prompts"], "--out", out,
                    "--target", "loss,sequence-logprob,token-losses", "--quiet")
    assert result.exit_code == 0, result.output
    with InfluenceFile(out) as f:
        assert f.task == "language-model"
        for target in ("loss", "sequence-logprob", "token-losses"):
            m = f.metrics(target)
            assert m["max_update_error"] <= 1e-5, (target, m)
            assert m["lc"] >= 0.9999 and m["rmre"] <= 5e-3, (target, m)
        tokens, logprob = f.influence("token-losses"), f.influence("sequence-logprob")
        assert tokens.shape[1:] == (3, 8) and logprob.shape[1] == 3
        # the continuation's token losses add up to minus its log-probability, per training example
        assert np.allclose(tokens.sum(2), -logprob, rtol=1e-4, atol=1e-6 * np.abs(logprob).max())
    result = invoke("inspect", out, "--audit", "1", "--top", "2", "--target", "sequence-logprob")
    assert result.exit_code == 0 and '"10\\n"' in result.stdout, result.output
    result = invoke("inspect", out, "--audit", "1", "--target", "sequence-logprob", "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output  # (N, T) targets: no classes to colour or group by
    assert (tmp_path / "plots" / "examples_audit1.png").is_file()


def test_prompt_longer_than_the_context_is_one_line(lm_run, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "1234567+", "continuation": "1\n"}) + "\n")
    out = tmp_path / "out.h5"
    result = invoke("replay", "--ckpts", lm_run["run"], "--audit-set", prompts, "--out", out, "--quiet")
    assert_one_line_error(result, 13, "long.jsonl", "longer than the context")
    assert_nothing_written(out)


def test_prompt_tokens_outside_the_vocabulary_are_one_line(lm_run, tmp_path):
    config = tmp_path / "run.toml"  # no vocab: the model knows the corpus's bytes, up to "=" (61)
    config.write_text(lm_run["config"].read_text().replace("vocab = 256, ", ""))
    train(load_config(config), tmp_path / "run", progress=False)
    prompts = tmp_path / "bytes.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+z=", "continuation": "2"}) + "\n")  # "z" is byte 122
    out = tmp_path / "out.h5"
    result = invoke("replay", "--ckpts", tmp_path / "run", "--audit-set", prompts, "--out", out, "--quiet")
    assert_one_line_error(result, 13, "bytes.jsonl", "token id 122, outside the model's vocabulary 0..61")
    assert_nothing_written(out)


def test_prompts_on_a_classification_run_are_refused(tiny_npz, tmp_path):
    data = load_dataset(f"npz:{tiny_npz}", 0, torch.float64)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "continuation": "b"}\n')
    with pytest.raises(Exception, match="language-model runs"):
        resolve_audit_set(str(path), data, task_for("classification"))


def test_model_vocabulary_smaller_than_the_data_is_one_line(lm_run, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text(lm_run["config"].read_text().replace("vocab = 256", "vocab = 40"))
    result = invoke("train", "--config", config, "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, 10, "vocab 40", "vocabulary")
    assert not (tmp_path / "run").exists()


def test_kernel_and_modes_of_a_language_model(lm_run, tmp_path):
    out = tmp_path / "k.h5"
    result = invoke("replay", "--ckpts", lm_run["run"], "--audit-set", lm_run["prompts"], "--out", out,
                    "--target", "sequence-logprob", "--kernel", "--modes", "2", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("inspect", out, "--kernel")
    assert result.exit_code == 0, result.output  # Table 1 needs class labels: said, not a traceback
    assert "for classification runs only" in result.stdout


def test_inspect_ranks_token_losses_per_position_as_a_loss(lm_run, tmp_path):
    out = tmp_path / "t.h5"
    result = invoke("replay", "--ckpts", lm_run["run"], "--audit-set", lm_run["prompts"], "--out", out,
                    "--target", "token-losses", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("inspect", out, "--audit", "0", "--top", "3", "--json")
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)
    with InfluenceFile(out) as f:
        y = f.audit_label[0]
        first = int(np.nonzero(y != IGNORE)[0][0])  # "4+4=" continued by "8\n": the "8"
        column = f.influence("token-losses")[:, 0, first]
    assert top["class"] == first and top["column"] == "position" and top["helpful_direction"] == "down"
    assert [e["influence"] for e in top["helpful"]] == pytest.approx(np.sort(column)[:3].tolist())
    result = invoke("inspect", out, "--audit", "0", "--target", "token-losses", "--class", "99")
    assert_one_line_error(result, 13, "--class: 99", "position")
    result = invoke("inspect", out, "--audit", "0", "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output


def test_audit_points_without_targets_or_with_unknown_targets_are_one_line(lm_run, tmp_path):
    data = load_dataset(f"text:{lm_run['root'] / 'sums.txt'}", 0, torch.float32, TASK)
    x, y = data.x_test[:2].numpy(), data.y_test[:2].numpy().copy()
    for name, targets, needle in (("none.npz", np.full_like(y, IGNORE), "point 0 has no target token"),
                                  ("wide.npz", np.where(y != IGNORE, 300, IGNORE), "target token 300")):
        np.savez(tmp_path / name, x=x, y=targets)
        out = tmp_path / "out.h5"
        result = invoke("replay", "--ckpts", lm_run["run"], "--audit-set", tmp_path / name, "--out", out, "--quiet")
        assert_one_line_error(result, 13, name, needle)
        assert_nothing_written(out)


def test_prompts_need_the_byte_tokenizer_and_text(lm_run, tmp_path):
    ids = np.random.default_rng(0).integers(1, 12, size=(24, 8))
    data = tmp_path / "ids.npz"
    np.savez(data, ids_train=ids, ids_test=ids[:4])
    from plgk_cli.data import load_dataset as load

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "continuation": "b"}\n')
    with pytest.raises(Exception, match="byte-level tokenizer, which the run's data"):
        resolve_audit_set(str(prompts), load(f"npz:{data}", 0, torch.float32, TASK), TASK)
    prompts.write_text('{"prompt": "1+1=", "continuation": "2"}\n{"prompt": "a", "continuation": "\\ud800"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: .* lone surrogate"):
        prompt_points(prompts, 10)


@pytest.mark.parametrize("arrays,needle", [
    (dict(mask_train=np.full((4, 5), 0.5)), "values other than 0 and 1"),
    (dict(ids_train=np.full((4, 5), 2 ** 40)), "must be below 16777216"),
    (dict(ids_train=np.ones((4, 1), dtype=np.int64)), "nothing to predict"),
    (dict(ids_train=np.ones((4, 0), dtype=np.int64)), "nothing to predict"),
])
def test_bad_token_arrays_are_one_line(tmp_path, arrays, needle):
    base = dict(ids_train=np.ones((4, 5), dtype=np.int64), ids_test=np.ones((2, 5), dtype=np.int64))
    np.savez(tmp_path / "bad.npz", **{**base, **arrays})
    with pytest.raises(DataError, match=needle):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", 0, torch.float32, TASK)


def test_a_model_whose_vocabulary_is_too_small_for_the_data_is_refused(lm_run, tmp_path):
    config = tmp_path / "tf.toml"
    config.write_text(lm_run["config"].read_text().replace('name = "gpt"', 'name = "transformer"')
                      .replace("kwargs = { vocab = 256, ", "kwargs = { "))
    result = invoke("train", "--config", config, "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(result, 10, "input embedding has 32 rows", "vocabulary")
