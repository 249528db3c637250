"""Hugging Face sequence classifiers (BERT, RoBERTa, DistilBERT, ...) as a model pool.

    tp = load_text_classifier_pool("bert-base-uncased", {"sst2": "ckpt/sst2", "mnli": "ckpt/mnli"})
    tv = tp.pool.task_vectors()                     # over the base model's tensors
    logits = tp.heads["sst2"](tp.encoder(**tp.tokenize(["a text"])))

The shared encoder is the classifier's base model (`model.base_model`, found through `base_model_prefix`); the
task head is every other module of the classifier. How a head consumes the base model's output is taken from the
architecture class (`ARCHITECTURES`), never from key names, so `head(encoder(**inputs))` equals the original
model's logits. An architecture not in the table is refused with its name.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symerge.errors import ValidationError, subject
from symerge.pool import ModelPool
from symerge.taskvectors import TaskVectors
from symerge.tensorio import check_safetensors_file  # noqa: F401 - re-exported (was defined here)
from symerge.tensorio import load_strict as _load_strict  # the name the families import
from symerge.validation import check_task_names

FEATURES = ("pooled", "first_token")
STEP_FUNCTIONS = {
    "relu": torch.relu,
    "as_sequence": lambda x: x.unsqueeze(1),  # [B, H] -> [B, 1, H] for heads that read features[:, 0]
}


@dataclass(frozen=True)
class HeadSpec:
    """How a classifier turns its base model's output into logits.

    `feature`: what the encoder returns — "pooled" (the base model's pooler output) or "first_token"
    (last_hidden_state[:, 0]). `steps`: the head's forward, in order — names of the classifier's own child
    modules, or functions from `STEP_FUNCTIONS`.
    """

    feature: str
    steps: tuple[str, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(s for s in self.steps if s not in STEP_FUNCTIONS)


_ROBERTA_LIKE = HeadSpec("first_token", ("as_sequence", "classifier"))  # classifier reads features[:, 0, :]
ARCHITECTURES: dict[str, HeadSpec] = {
    # pooled output -> dropout -> linear
    "BertForSequenceClassification": HeadSpec("pooled", ("dropout", "classifier")),
    "AlbertForSequenceClassification": HeadSpec("pooled", ("dropout", "classifier")),
    # <s> hidden state -> ClassificationHead (dropout, dense, act, dropout, out_proj)
    "RobertaForSequenceClassification": _ROBERTA_LIKE,
    "XLMRobertaForSequenceClassification": _ROBERTA_LIKE,
    "CamembertForSequenceClassification": _ROBERTA_LIKE,
    "ElectraForSequenceClassification": _ROBERTA_LIKE,
    # [CLS] hidden state -> pre_classifier -> ReLU -> dropout -> classifier
    "DistilBertForSequenceClassification": HeadSpec("first_token", ("pre_classifier", "relu", "dropout", "classifier")),
    # hidden states -> ContextPooler (reads [:, 0]) -> dropout -> classifier
    "DebertaV2ForSequenceClassification": HeadSpec("first_token", ("as_sequence", "pooler", "dropout", "classifier")),
}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def head_spec(architecture: str) -> HeadSpec:
    if architecture not in ARCHITECTURES:
        raise ValidationError(
            f"architecture '{architecture}' is not supported for text classifiers; supported: {supported_architectures()}"
        )
    return ARCHITECTURES[architecture]


def transformers_class(architecture: str) -> type:
    """The transformers class named `architecture` (shared by the text and image families)."""
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise ValidationError(f"architecture '{architecture}' is not available in transformers {transformers.__version__}")
    return cls


def architecture_class(architecture: str) -> type:
    head_spec(architecture)
    return transformers_class(architecture)


class SequenceEncoder(nn.Module):
    """A classifier's base model, returning exactly what its head consumes ([B, hidden]).

    The base model's children are registered as this module's own children, so `state_dict()` keys are the base
    model's keys (e.g. `encoder.layer.0.attention.self.query.weight`) and functional parameter substitution
    reaches the shared submodules.
    """

    def __init__(self, base_model: nn.Module, feature: str):
        super().__init__()
        if feature not in FEATURES:
            raise ValidationError(f"encoder feature must be one of {FEATURES}, got '{feature}'")
        own = list(base_model._parameters) + [k for k in base_model._buffers if k not in base_model._non_persistent_buffers_set]
        if own:
            raise ValidationError(f"{type(base_model).__name__} holds tensor '{own[0]}' directly; cannot wrap it")
        self.__dict__["base_model"] = base_model  # not a registered child: its children are registered below
        for name, child in base_model.named_children():
            self.add_module(name, child)
        self.feature = feature
        accepted = inspect.signature(base_model.forward).parameters
        self.input_names = tuple(n for n in INPUT_NAMES if n in accepted)

    @property
    def config(self) -> Any:
        return self.base_model.config

    def train(self, mode: bool = True) -> "SequenceEncoder":
        super().train(mode)
        self.base_model.training = mode
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        kwargs = {k: v for k, v in given.items() if v is not None and k in self.input_names}
        out = self.base_model(**kwargs, return_dict=True)
        if self.feature == "pooled":
            if getattr(out, "pooler_output", None) is None:
                raise ValidationError(f"{type(self.base_model).__name__} has no pooler output")
            return out.pooler_output
        return out.last_hidden_state[:, 0]


class SequenceClassificationHead(nn.Module):
    """Every non-base module of a classifier, under its original name, run in the architecture's order.

    State-dict keys are the classifier's own (`classifier.weight`, `classifier.dense.weight`, ...).
    """

    def __init__(self, modules: Mapping[str, nn.Module], steps: Sequence[str]):
        super().__init__()
        for step in steps:
            if step in STEP_FUNCTIONS:
                continue
            if step not in modules:
                raise ValidationError(f"head step '{step}' names no module; modules: {sorted(modules)}")
            self.add_module(step, modules[step])
        self.steps = tuple(steps)

    def forward(self, features: Tensor) -> Tensor:
        x = features
        for step in self.steps:
            x = STEP_FUNCTIONS[step](x) if step in STEP_FUNCTIONS else getattr(self, step)(x)
        return x


def split_classifier(model: nn.Module) -> tuple[SequenceEncoder, SequenceClassificationHead]:
    """(encoder, head) of a supported `*ForSequenceClassification` model; the modules are shared, not copied."""
    architecture = type(model).__name__
    spec = head_spec(architecture)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):
        raise ValidationError(f"{architecture}: no base model under base_model_prefix '{prefix}'")
    rest = {name: child for name, child in model.named_children() if child is not base}
    unknown = sorted(set(rest) - set(spec.modules))
    missing = sorted(set(spec.modules) - set(rest))
    if unknown or missing:
        raise ValidationError(f"{architecture}: head modules {sorted(rest)} differ from the expected {list(spec.modules)}"
                              " (unsupported variant of this architecture)")
    if model._parameters or [k for k in model._buffers if k not in model._non_persistent_buffers_set]:
        raise ValidationError(f"{architecture}: holds tensors outside its base model and head modules")
    return SequenceEncoder(base, spec.feature), SequenceClassificationHead(rest, spec.steps)


# --- loading ---------------------------------------------------------------------------------------------------------
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or 'newly initialised weights' chatter while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_source(source: str | Path, owner: str) -> str:
    """A local directory (checked here: exists, has config.json, readable weights) or a hub id (left to HF)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValidationError(f"{owner}: '{path}' is a file; expected a Hugging Face model directory")
        if not (path / "config.json").is_file():
            raise ValidationError(f"{owner}: '{path}' is not a Hugging Face model directory (no config.json)")
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        if not weights:
            raise ValidationError(f"{owner}: '{path}' has no weights file (*.safetensors or *.bin)")
        for file in path.glob("*.safetensors"):
            check_safetensors_file(file, owner)
        return str(path)
    if looks_like_path(text):
        raise ValidationError(f"{owner}: '{text}' does not exist")
    return hub_source(text, owner)


def looks_like_path(text: str) -> bool:
    """A value that names a file-system location, never a hub id: starts with '/', '.' or '~', has a parent
    directory that exists, or is not of the hub's `name` / `org/name` form."""
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or not HUB_ID.match(text):
        return True
    parent = Path(text).parent
    return parent != Path(".") and parent.is_dir()


def hub_source(repo_id: str, owner: str) -> str:
    """A hub id, asked about ONCE (from_pretrained retries each file with back-off: 20-40 s offline).

    Offline mode: left to from_pretrained (the cache answers at once). Online: one metadata request for its
    config.json; if that fails, a cached snapshot is used as a local directory, else a clear error.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return repo_id
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=10)
        return repo_id
    except Exception as err:  # noqa: BLE001 - network, 401/404: all mean "not usable as a hub id now"
        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent)
        raise ValidationError(f"{owner}: '{repo_id}' is not a local path, and the Hugging Face hub has no model "
                              f"'{repo_id}' or cannot be reached ({type(err).__name__}: {err})") from None


def read_config(source: str, owner: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - wrap every loader failure with the owner and path
        if not Path(source).exists():
            raise ValidationError(f"{owner}: '{source}' is not a local directory, and loading it as a Hugging Face hub "
                                  f"id failed (offline, or no such model?): {type(err).__name__}: {err}") from None
        raise ValidationError(f"{owner}: cannot read the model config of '{source}': {err}") from None


def load_classifier(source: str, owner: str, cls: type | None = None, config: Any = None,
                    allow_missing_head: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a supported sequence classifier; refuse missing, unexpected or mis-shaped tensors (they would silently
    be random or dropped). `dtype`: cast every tensor to it (None: keep the stored dtype)."""
    from transformers import AutoModelForSequenceClassification

    loader = cls if cls is not None else AutoModelForSequenceClassification
    kwargs = {"config": config} if config is not None else {}
    kwargs["dtype"] = dtype if dtype is not None else "auto"
    try:
        with quiet_transformers():
            model, info = loader.from_pretrained(source, output_loading_info=True, **kwargs)
    except ValidationError:
        raise
    except Exception as err:  # noqa: BLE001
        if "ignore_mismatched_sizes" in str(err):
            raise shape_mismatch_error(loader, source, owner, kwargs) from None
        raise ValidationError(f"{owner}: cannot load '{source}': {type(err).__name__}: {err}") from None
    head_spec(type(model).__name__)
    prefix = model.base_model_prefix + "."
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    if allow_missing_head:  # a base model / other-task checkpoint: only its base-model tensors matter
        missing = [k for k in missing if k.startswith(prefix)]
        unexpected = [k for k in unexpected if k.startswith(prefix)]
    for keys, why in ((missing, "lacks tensor"), (unexpected, "holds unexpected tensor")):
        if keys:
            raise ValidationError(
                f"{owner}: '{source}' {why} '{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
                + f" for {type(model).__name__}; " + ("it would be randomly initialised" if keys is missing else
                                                       "transformers would silently drop it")
            )
    return model.eval()


def shape_mismatch_error(loader: Any, source: str, owner: str, kwargs: dict[str, Any]) -> ValidationError:
    """transformers logs the mismatched tensors in a report we silence, then says 'see the above report': load
    again, tolerating the mismatch, to name them."""
    try:
        with quiet_transformers():
            _, info = loader.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        mismatched = sorted(info.get("mismatched_keys", []))
    except Exception:  # noqa: BLE001 - the first failure is reported either way
        mismatched = []
    if not mismatched:
        return ValidationError(f"{owner}: '{source}': tensor shapes do not match its config.json")
    shown = "; ".join(f"'{key}' has shape {tuple(stored)}, config implies {tuple(expected)}"
                      for key, stored, expected in mismatched[:4])
    more = f" (and {len(mismatched) - 4} more)" if len(mismatched) > 4 else ""
    return ValidationError(f"{owner}: '{source}': tensor shapes disagree with its config.json (e.g. num_labels / "
                           f"id2label, hidden size): {shown}{more}")


def class_names_from_config(config: Any) -> list[str]:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]


@dataclass
class TextClassifierPool:
    """Pretrained base model (as encoder), per-task heads, and the validated `ModelPool` over the base tensors."""

    architecture: str
    encoder: SequenceEncoder
    heads: dict[str, SequenceClassificationHead]
    pool: ModelPool
    configs: dict[str, Any]  # each expert's classifier config
    tokenizer: Any = None
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.pool.tasks)

    @property
    def spec(self) -> HeadSpec:
        return ARCHITECTURES[self.architecture]

    @property
    def num_labels(self) -> dict[str, int]:
        return {t: int(self.configs[t].num_labels) for t in self.tasks}

    @property
    def class_names(self) -> dict[str, list[str]]:
        return {t: class_names_from_config(self.configs[t]) for t in self.tasks}

    def task_vectors(self, dtype: torch.dtype | str = torch.float32) -> TaskVectors:
        return self.pool.task_vectors(dtype=dtype)

    def tokenize(self, texts: Sequence[str], max_len: int = 128) -> dict[str, Tensor]:
        from symerge.models.text import tokenize

        if self.tokenizer is None:
            raise ValidationError(f"no tokenizer found in the pretrained or expert directories ({self.sources})")
        return tokenize(self.tokenizer, texts, max_len)

    def expert_model(self, task: str) -> nn.Module:
        """The expert as a full classifier again (for checks)."""
        return build_classifier(self.architecture, self.configs[task], self.pool.experts[task], self.heads[task].state_dict())


def load_tokenizer(sources: Sequence[str]) -> Any:
    from transformers import AutoTokenizer

    for source in sources:
        try:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(source)
        except Exception:  # noqa: BLE001 - a model dir without tokenizer files: try the next one
            continue
    return None


def load_text_classifier_pool(pretrained: str | Path, experts: Mapping[str, str | Path], dtype: torch.dtype | None = None,
                              progress: bool = False, lazy: bool = False) -> TextClassifierPool:
    """Pool of K `AutoModelForSequenceClassification` experts fine-tuned from `pretrained`.

    `pretrained` may be a base model (AutoModel) or a classifier of the same architecture; local directory or hub
    id. Experts may have different `num_labels`. Everything is validated before it is returned: the experts'
    architecture, the base-model tensors (same keys / shapes / dtypes as the pretrained, finite) and head widths.
    `dtype`: cast every checkpoint to it (None: as stored, and then they must agree). `lazy`: the experts'
    encoder tensors stay in their safetensors files (`pool.experts[task]` is then a `tensorio.LazyStateDict`, read
    tensor by tensor by the validation and the streaming merge; `dict(...)` reads it whole), so the pool holds
    one model instead of K + 1.
    """
    if not isinstance(experts, Mapping):
        raise ValidationError(f"experts must be a dict task -> checkpoint, got {type(experts).__name__}")
    tasks = check_task_names(experts.keys())
    if len(tasks) < 2:
        raise ValidationError(f"a pool needs at least two experts, got {len(tasks)} ({tasks})")
    with subject("pretrained"):
        pre_source = resolve_source(pretrained, "pretrained")
    sources = {}
    for t in tasks:
        with subject("expert", t):
            sources[t] = resolve_source(experts[t], f"expert '{t}'")

    from tqdm.auto import tqdm

    # Each expert is loaded whole once (transformers' own checks: missing / unexpected / mis-shaped tensors) and
    # split into its head and its encoder; with `lazy`, the encoder tensors are then left in the checkpoint's
    # safetensors files and read one at a time when validated and merged (`lazy_encoder`).
    classes: dict[str, type] = {}
    configs: dict[str, Any] = {}
    heads: dict[str, SequenceClassificationHead] = {}
    expert_encoders: dict[str, Mapping[str, Tensor]] = {}
    for task in tqdm(tasks, desc="load experts", unit="model", disable=None if progress else True):  # None: TTY only
        owner = f"expert '{task}'"
        with subject("expert", task):
            config = read_config(sources[task], owner)
            declared = list(getattr(config, "architectures", None) or [])
            if declared and not any(a.endswith("ForSequenceClassification") for a in declared):
                raise ValidationError(f"{owner}: '{sources[task]}' holds a {declared[0]}, not a sequence classifier "
                                      f"(supported: {supported_architectures()})")
            if declared and declared[0] not in ARCHITECTURES:
                head_spec(declared[0])  # raises, naming the architecture
            model = load_classifier(sources[task], owner, dtype=dtype)
        classes[task], configs[task] = type(model), model.config
        if type(model) is classes[tasks[0]]:  # else refused below, before anything else is read
            enc, head = split_classifier(model)
            heads[task] = own_storage(head).eval() if lazy else head.eval()
            state = {k: v.detach() for k, v in enc.state_dict().items()}
            expert_encoders[task] = lazy_encoder(sources[task], model, state, owner, dtype) if lazy else state
        model = enc = state = None  # lazy: the expert's in-memory tensors go now (its head modules stay)
    first = tasks[0]
    architecture = classes[first].__name__
    for task in tasks[1:]:
        other = classes[task].__name__
        if other != architecture:
            with subject("expert", task):
                raise ValidationError(f"expert '{task}' is a {other}, but expert '{first}' is a {architecture}: "
                                      "experts must share one architecture")

    cls = classes[first]
    with subject("pretrained"):
        pre_config = read_config(pre_source, "pretrained")
        if pre_config.model_type != configs[first].model_type:
            raise ValidationError(f"pretrained '{pre_source}' is a '{pre_config.model_type}' model, but the experts "
                                  f"are '{configs[first].model_type}' ({architecture})")
        pretrained_model = load_classifier(pre_source, "pretrained", cls=cls, config=pre_config,
                                           allow_missing_head=True, dtype=dtype)
    encoder, _ = split_classifier(pretrained_model)
    pool = ModelPool.from_parts(encoder.state_dict(), expert_encoders, heads,
                                num_classes={t: int(configs[t].num_labels) for t in tasks})
    tokenizer = load_tokenizer([pre_source] + [sources[t] for t in tasks])
    return TextClassifierPool(
        architecture=architecture, encoder=encoder.eval(), heads=heads, pool=pool, configs=configs, tokenizer=tokenizer,
        sources={"pretrained": pre_source, "experts": dict(sources)},
    )


def own_storage(module: nn.Module) -> nn.Module:
    """`module` with its tensors copied into memory of their own. transformers hands out tensors that are views of
    the whole checkpoint file's memory map: keeping one small head tensor would keep the file's pages resident."""
    with torch.no_grad():
        for child in module.modules():
            for name, param in child._parameters.items():
                if param is not None:
                    param.data = param.data.clone()
            for name, buffer in child._buffers.items():
                if buffer is not None:
                    child._buffers[name] = buffer.clone()
    return module


def lazy_encoder(source: str, model: nn.Module, state: dict[str, Tensor], owner: str,
                 dtype: torch.dtype | None) -> Mapping[str, Tensor]:
    """The expert's encoder tensors as a `LazyStateDict` over its local safetensors files (the base model's tensors
    under `base_model_prefix`), checked to hold exactly what transformers loaded: same keys, shapes, dtypes and
    values. Anything else (a hub id, .bin weights, keys transformers renames or ties, a dtype kept apart): the
    loaded tensors themselves."""
    from symerge.tensorio import LazyStateDict

    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if not files:
        return state
    prefix = model.base_model_prefix + "."
    lazy = LazyStateDict.from_files(files, owner, dtype, rename=lambda k: k[len(prefix):] if k.startswith(prefix) else None)
    if lazy is None or set(lazy) != set(state):
        return state
    for key, tensor in state.items():
        if lazy.layout(key) != (tuple(tensor.shape), tensor.dtype) or not torch.equal(lazy[key], tensor):
            return state
    return lazy.select(state)  # in the encoder's key order


# --- rebuilding / exporting ------------------------------------------------------------------------------------------
def build_classifier(architecture: str, config: Any, encoder_state: Mapping[str, Tensor],
                     head_state: Mapping[str, Tensor]) -> nn.Module:
    """A full `*ForSequenceClassification` model carrying the given base-model and head weights (strict)."""
    cls = architecture_class(architecture)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        model = cls(copy.deepcopy(config))
    encoder, head = split_classifier(model)
    with torch.no_grad():
        _load_strict(encoder, encoder_state, "encoder")
        _load_strict(head, head_state, "head")
    return model.eval()


def task_config(config: Any, class_names: Sequence[str] | None) -> Any:
    """The expert's classifier config with `id2label` / `label2id` from the class names."""
    out = copy.deepcopy(config)
    if class_names is not None:
        out.id2label = {i: str(n) for i, n in enumerate(class_names)}
        out.label2id = {str(n): i for i, n in enumerate(class_names)}
    return out


def save_encoder(encoder: SequenceEncoder, state: Mapping[str, Tensor], directory: Path) -> None:
    """The base model with `state` in `save_pretrained` format (`encoder` itself is neither modified nor copied:
    `state`, checked to fit it, is written in place of its own tensors)."""
    from symerge.tensorio import fitting_state

    weights = fitting_state(encoder.state_dict(), state, "encoder")  # the encoder's keys are the base model's
    with quiet_transformers():
        encoder.base_model.save_pretrained(directory, state_dict=weights)


def load_encoder(directory: Path, architecture: str) -> SequenceEncoder:
    """Rebuild the encoder saved by `save_encoder` (through the classifier class, so e.g. no RoBERTa pooler)."""
    cls = architecture_class(architecture)
    config = read_config(str(directory), "merged encoder")
    model = load_classifier(str(directory), "merged encoder", cls=cls, config=config, allow_missing_head=True)
    encoder, _ = split_classifier(model)
    return encoder.eval()


def empty_head(architecture: str, config: Any) -> SequenceClassificationHead:
    """A head of the right shapes for `config` (weights to be loaded)."""
    cls = architecture_class(architecture)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        model = cls(copy.deepcopy(config))
    return split_classifier(model)[1].eval()


def config_to_json(config: Any) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_from_json(text: str, like: Any) -> Any:
    return type(like).from_dict(json.loads(text))
