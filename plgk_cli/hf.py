"""Hugging Face support (``pip install 'plgk[hf]'``): a ``transformers`` causal LM as the model of
a run, and a ``transformers.Trainer`` callback that records a Trainer run as a plgk trajectory.

``causal_lm`` builds the model from a local config only (a dict of config values, or the path of
a local directory or config.json): replay rebuilds the model from the run's manifest, so the
model must be a pure function of (config, seed), and plgk never downloads anything.

``PlgkCallback`` wraps a plgk Recorder around ``Trainer.train()``. What replay cannot model is
refused before the first update, one line each (docs/hf.md): fused optimizers, label smoothing,
fp16/bf16, gradient accumulation over micro-batches, data the callback did not provide, a model
other than the one ``model_name(**model_kwargs)`` builds.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import torch

from plgk_cli.data import Dataset, load_dataset
from plgk_cli.errors import ConfigError, DependencyError, RecorderError
from plgk_cli.tasks.language_model import IGNORE

INSTALL = "pip install 'plgk[hf]'"
TASK = "language-model"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DependencyError(f"Hugging Face models need transformers: {INSTALL}") from None
    import plgk_cli.per_example.hf_conv1d  # noqa: F401  (GPT-2's Conv1D rule, once transformers is in)
    return transformers


def _config_values(config) -> dict:
    """The config as a dict, from a dict or a local directory / config.json; anything else, a hub
    name above all, is refused (ValueError: the model builder's wrapper makes it one line)."""
    if isinstance(config, dict):
        return dict(config)
    if not isinstance(config, (str, Path)):
        raise ValueError(f"config must be a dict of config values or the path of a local directory "
                         f"or config.json, got {type(config).__name__}")
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"config {str(config)!r} is not a local directory or config.json; plgk builds "
                         "Hugging Face models from a local config and never downloads (a hub name such "
                         "as 'gpt2' would need one): give the config as a dict ({'model_type': 'gpt2', "
                         "'n_layer': 2, ...}) or the path of a directory written by "
                         "AutoConfig.from_pretrained(...).save_pretrained(DIR)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config {path}: not a readable JSON config ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"config {path}: holds {type(values).__name__}, not a JSON object")
    return values


def causal_lm(in_shape: tuple, num_classes: int, config, attn_implementation: str = "eager",
              **overrides) -> torch.nn.Module:
    """A ``transformers`` causal LM (AutoModelForCausalLM.from_config) with freshly initialised
    weights drawn from torch's generator, for token ids (B, T), T = in_shape[0], and a vocabulary of
    at least ``num_classes`` (the ids the data needs). ``config``: a dict with "model_type" (e.g.
    {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256,
    "n_positions": 32}) or a local directory / config.json; ``overrides`` replace its values.
    ``attn_implementation`` "eager" by default: the plain attention, the same on every device."""
    transformers = _transformers()
    if len(in_shape) != 1:
        raise ValueError(f"causal_lm takes token sequences (B, length); the inputs have rows {tuple(in_shape)}")
    values = {**_config_values(config), **overrides}
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError('config needs "model_type" (e.g. "gpt2"), the architecture to build')
    if values.get("auto_map") or values.get("trust_remote_code"):
        raise ValueError("config names remote code (auto_map); plgk builds the architectures transformers "
                         "ships, never code from the hub: drop auto_map")
    values.pop("architectures", None)  # informational in a saved config.json; from_config ignores it
    try:
        config_class = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r} for transformers "
                         f"{transformers.__version__}") from None
    known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {})) | {
        "use_cache", "tie_word_embeddings", "torch_dtype", "dtype", "transformers_version"}
    unknown = sorted(set(values) - known)
    if unknown:  # a misspelt key would silently keep the default (n_layers -> 12 layers)
        raise ValueError(f"config: {', '.join(map(repr, unknown))} not known to {config_class.__name__}")
    values.setdefault("use_cache", False)  # training and replay never generate
    try:
        cfg = config_class(**values)
    except Exception as exc:  # transformers validates the values (types, ranges) in its own classes
        raise ValueError(f"config: {config_class.__name__} refused the values ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None or vocab < num_classes:
        raise ValueError(f"vocab_size {vocab} is smaller than the data's vocabulary ({num_classes} token "
                         "ids): raise vocab_size")
    context = getattr(cfg, "max_position_embeddings", None)
    if context is not None and context < in_shape[0]:
        raise ValueError(f"the context ({context} positions: n_positions / max_position_embeddings) is "
                         f"shorter than the data's sequences ({in_shape[0]} tokens): raise it")
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(type(cfg), None)
    if model_class is None:
        raise ValueError(f"model_type {model_type!r} has no causal-LM head in transformers")
    return model_class._from_config(cfg, attn_implementation=attn_implementation)


class _Rows(torch.utils.data.Dataset):
    """The training split as the Trainer sees it: {"input_ids", "labels"} per row, and the row's
    index, which the callback's collate wrapper takes out of the batch again and queues.

    Hugging Face's labels are unshifted (labels[t] = the token at t, -100 where there is none;
    the model shifts them), plgk's targets y shifted (y[t] = the token after t). With right
    padding, a position t has a target exactly when t + 1 is a real token, so labels[t + 1] = y[t].
    labels[0] is never a target once shifted and is set to -100: the Trainer divides the summed
    token losses by num_items_in_batch, which it counts over labels[..., 1:] only for models whose
    config names ForCausalLMLoss, over all labels otherwise (GPT-2's config names none); with
    labels[0] = -100 both counts are the number of targets, as plgk's batch loss has it."""

    KEY = "plgk_row"

    def __init__(self, data: Dataset):
        self.ids = data.x_train
        labels = torch.full_like(data.y_train, IGNORE)
        labels[:, 1:] = data.y_train[:, :-1]
        self.labels = labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i], self.KEY: int(i)}


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    # AcceleratedOptimizer is a torch Optimizer itself (a wrapper class replay does not know)
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _make_callback():
    transformers = _transformers()

    class PlgkCallback(transformers.TrainerCallback):
        """Records a ``transformers.Trainer`` run as a plgk trajectory in ``out_dir``.

            data = load_dataset("addition", 0, torch.float32, task_for("language-model"))
            callback = PlgkCallback("runs/hf", data, model_kwargs={"config": CONFIG})
            trainer = Trainer(model, args, train_dataset=callback.train_dataset, callbacks=[callback])
            trainer.train()

        ``dataset``: a spec that load_dataset reads for the language-model task, or the Dataset
        it returned; the Trainer must train on ``callback.train_dataset`` (its rows, by index).
        ``model_name``/``model_kwargs``: what replay rebuilds the model from (checked against the
        Trainer's model). The run's batch size and epochs come from the TrainingArguments."""

        def __init__(self, out_dir, dataset, *, model_name: str = "plgk_cli.hf:causal_lm",
                     model_kwargs: dict | None = None, data_seed: int = 0, checkpoint_every: int = 1):
            from plgk_cli.tasks import task_for
            self.task = task_for(TASK)
            self.out_dir = Path(out_dir)
            self.data = load_dataset(dataset, data_seed, torch.float32, self.task) \
                if isinstance(dataset, str) else dataset
            if not isinstance(self.data, Dataset):
                raise ConfigError(f"PlgkCallback: dataset must be a spec or a plgk Dataset, got "
                                  f"{type(dataset).__name__}")
            if self.data.y_train.dim() != 2 or self.data.x_train.is_floating_point():
                raise ConfigError("PlgkCallback: the dataset is not a language-model dataset; load it with "
                                  "load_dataset(spec, seed, torch.float32, task_for('language-model'))")
            self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
            self.data_seed, self.checkpoint_every = data_seed, checkpoint_every
            self.train_dataset = _Rows(self.data)
            self.recorder = None
            self._queue: collections.deque = collections.deque()  # collated batches' rows, in order
            self._batch = None  # rows of the update being made
            self._loss = None
            self._max_norm = 0.0
            self._hooks: list = []

        # -------------------------------------------------------------- refusals

        def _refuse(self, args) -> None:
            optim = str(getattr(args.optim, "value", args.optim))
            if "fused" in optim:
                raise RecorderError(f"TrainingArguments: optim={optim!r} is a fused optimizer, whose arithmetic "
                                    "replay does not re-derive within its gate here; use optim='adamw_torch'")
            if optim not in ("adamw_torch", "sgd", "adagrad", "rmsprop"):
                raise RecorderError(f"TrainingArguments: optim={optim!r} is not one replay models; use "
                                    "optim='adamw_torch' (or 'sgd', 'rmsprop', 'adagrad')")
            if args.label_smoothing_factor:
                raise RecorderError(f"TrainingArguments: label_smoothing_factor={args.label_smoothing_factor} "
                                    "changes the loss from the task's token cross-entropy, which replay "
                                    "re-derives; use label_smoothing_factor=0")
            for flag in ("fp16", "bf16", "fp16_full_eval", "bf16_full_eval"):
                if getattr(args, flag, False):
                    raise RecorderError(f"TrainingArguments: {flag}=True trains in mixed precision, whose "
                                        "autocast rounding replay does not reproduce; train in float32 "
                                        f"({flag}=False)")
            if args.gradient_accumulation_steps != 1:
                raise RecorderError(f"TrainingArguments: gradient_accumulation_steps="
                                    f"{args.gradient_accumulation_steps}; the Trainer weighs micro-batches by "
                                    "their token counts across the step and its last step may be short, "
                                    "which one recorded batch does not describe: use "
                                    "gradient_accumulation_steps=1 and a larger per_device_train_batch_size")
            if args.dataloader_num_workers:
                raise RecorderError(f"TrainingArguments: dataloader_num_workers={args.dataloader_num_workers}; "
                                    "the callback reads each batch's rows in the main process: use "
                                    "dataloader_num_workers=0")
            if getattr(args, "world_size", 1) > 1:
                raise RecorderError("PlgkCallback records single-process training; run the Trainer in one "
                                    "process")
            if getattr(args, "neftune_noise_alpha", None):
                raise RecorderError("TrainingArguments: neftune_noise_alpha adds noise to the embeddings "
                                    "outside torch's recorded forward; leave it None")

        def on_init_end(self, args, state, control, **kwargs):
            self._refuse(args)

        # -------------------------------------------------------------- the run

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                           train_dataloader=None, **kwargs):
            from plgk_cli.recorder import Recorder
            self._refuse(args)
            if train_dataloader is None or train_dataloader.dataset is not self.train_dataset:
                raise RecorderError("PlgkCallback: the Trainer does not train on callback.train_dataset; pass "
                                    "Trainer(..., train_dataset=callback.train_dataset) so that every batch's "
                                    "rows are known")
            dtypes = {p.dtype for p in model.parameters()}
            if dtypes != {torch.float32}:
                raise RecorderError(f"model: parameters of dtype {sorted(map(str, dtypes))}; record a float32 "
                                    "model (Hugging Face's causal-LM loss computes in float32, so the updates "
                                    "of a float64 model are float32-accurate, below replay's float64 gate)")
            torch_optimizer = _unwrap_optimizer(optimizer)
            batch_size = args.per_device_train_batch_size
            steps = state.max_steps
            self.recorder = Recorder(
                self.out_dir, model, torch_optimizer, model_name=self.model_name, model_kwargs=self.model_kwargs,
                dataset=self.data, data_seed=self.data_seed, batch_size=batch_size,
                epochs=max(1, math.ceil(steps / max(1, len(train_dataloader)))),
                steps_per_epoch=len(train_dataloader), task=self.task, checkpoint_every=self.checkpoint_every)
            # The Trainer clips with accelerator.clip_grad_norm_ before on_pre_optimizer_step; the
            # callback clips instead, with the same arithmetic, so the coefficient is recorded.
            self._max_norm = float(args.max_grad_norm or 0.0)
            args.max_grad_norm = 0.0
            # accelerate's DataLoaderShard wraps a torch DataLoader (base_dataloader), whose
            # iterator calls collate_fn: each batch's rows join the queue as it is collated. A
            # queue, since accelerate collates one batch ahead of the step that uses it.
            loader = train_dataloader
            while "base_dataloader" in vars(loader):
                loader = loader.base_dataloader
            collate = loader.collate_fn

            def collate_rows(items):
                self._queue.append([item.pop(_Rows.KEY) for item in items])
                return collate(items)

            loader.collate_fn = collate_rows
            self._loader, self._collate = loader, collate
            self._hooks = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                           model.register_forward_hook(self._after_forward)]

        def on_step_begin(self, args, state, control, **kwargs):
            if not self._queue:
                raise RecorderError("PlgkCallback: a training step began without a batch from "
                                    "callback.train_dataset's dataloader")
            self._batch = torch.tensor(self._queue.popleft(), dtype=torch.int64)
            self._loss = None

        def _before_forward(self, module, args, kwargs):
            if not (module.training and torch.is_grad_enabled()) or self._batch is None:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or not torch.equal(ids.detach().cpu(), self.data.x_train[self._batch]):
                raise RecorderError("PlgkCallback: the training forward's input_ids are not the rows the "
                                    "dataloader collated for this step; train on callback.train_dataset "
                                    "with the Trainer's own dataloader")

        def _after_forward(self, module, args, output):
            if module.training and torch.is_grad_enabled() and self._batch is not None:
                loss = getattr(output, "loss", None)
                if loss is None:
                    raise RecorderError("PlgkCallback: the model returned no loss (a compute_loss_func or "
                                        "label smoother computed it outside the model); let the causal LM "
                                        "compute its own loss from labels")
                self._loss = loss.detach()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self._max_norm > 0:
                self.recorder.clip_grad_norm(self._max_norm)

        def on_step_end(self, args, state, control, **kwargs):
            if self._loss is None:
                raise RecorderError("PlgkCallback: a step ended without a training forward of the model")
            self.recorder.step(self._batch, self._loss)
            self._batch = None

        def on_train_end(self, args, state, control, **kwargs):
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self._loader.collate_fn = self._collate
            if self.recorder is not None:
                self.recorder.finish()
            args.max_grad_norm = self._max_norm  # the arguments as the user gave them

    return PlgkCallback


def __getattr__(name):  # PlgkCallback subclasses transformers.TrainerCallback: built on first use
    if name == "PlgkCallback":
        cls = _make_callback()
        globals()["PlgkCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
