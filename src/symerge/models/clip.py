"""CLIP image encoders and zero-shot heads: Hugging Face CLIP dirs, and open_clip / task_vectors weights mapped onto them.

Two ways in, one encoder format (`CLIPVisionEncoder`, tensor names identical to `CLIPVisionModelWithProjection`):

* Hugging Face (FusionBench layout): a pretrained `CLIPModel` dir plus one `CLIPVisionModel` dir per task
  (`openai/clip-vit-base-patch32` + `tanganke/clip-vit-base-patch32_<task>`). Experts carry only the vision tower;
  the projection comes from the pretrained model. Heads are zero-shot classifiers built from class names and prompt
  templates with the CLIP text tower, cached on disk.

      encoder, heads, pool = load_clip_pool("clip-vit-base-patch32", {"cars": "ft/cars", ...},
                                            class_names={"cars": [...], ...})

* task_vectors / open_clip (after `symerge convert`): `openclip_to_hf_vision` maps an open_clip ViT image tower
  onto the same names (fused `in_proj` split into q/k/v, `proj` transposed), and task_vectors `ClassificationHead`s
  become `ClassificationHead` here (`load_converted_pool`).

Features: the encoder returns CLIP image embeddings [B, projection_dim], L2-normalised by default (as CLIP
zero-shot classification and task_vectors' `ClassificationHead(normalize=True)` expect), so a zero-shot head is a
plain linear layer: logits = logit_scale.exp() · <normalised image embedding, class text embedding>.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symerge.errors import ValidationError, subject
from symerge.pool import ModelPool, as_state_dict, head_width
from symerge.tensorio import load_strict
from symerge.validation import check_same_layout, check_task_names

PathLike = str | os.PathLike
Template = str | Callable[[str], str]

# The CLIP prompt-ensembling subset (CLIP repo, "Prompt_Engineering_for_ImageNet"), plus the plain prompt.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

HEAD_CACHE_VERSION = "1"
OPENCLIP_PREFIXES = ("model.visual.", "visual.", "module.model.visual.", "module.visual.", "image_encoder.model.visual.")


# --- heads ------------------------------------------------------------------------------------------------------


class ClassificationHead(nn.Linear):
    """Linear classifier that optionally L2-normalises its input first (task_vectors' `ClassificationHead`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, normalize: bool = True):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, dtype=weight.dtype)
        self.normalize = bool(normalize)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias if bias is not None else torch.zeros(out_features, dtype=weight.dtype))

    def forward(self, inputs: Tensor) -> Tensor:
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", normalize={self.normalize}"


def head_from_state(state: Mapping[str, Tensor], normalize: bool = True, owner: str = "head") -> ClassificationHead:
    """Our head from a {'weight': [C, D], 'bias': [C]} state (bias optional)."""
    weight = state.get("weight")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValidationError(f"{owner}: needs a 2-D tensor 'weight' [classes, features], got keys {sorted(state)}")
    bias = state.get("bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValidationError(f"{owner}: tensor 'bias' has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    extra = sorted(set(state) - {"weight", "bias"})
    if extra:
        raise ValidationError(f"{owner}: unexpected tensor '{extra[0]}' (a head holds 'weight' and 'bias')")
    return ClassificationHead(weight.detach().clone(), None if bias is None else bias.detach().clone(), normalize)


def save_head(head: nn.Linear, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """A head as safetensors ('weight', 'bias'; metadata 'normalize')."""
    from safetensors.torch import save_file

    from symerge.atomic import share_modes

    meta = {"symerge": "head", "normalize": str(bool(getattr(head, "normalize", False))).lower(), **dict(metadata or {})}
    tensors = {"weight": head.weight.detach().contiguous().clone()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().contiguous().clone()
    save_file(tensors, str(path), metadata=meta)
    share_modes(Path(path))  # safetensors writes 0600; give the file the modes of a plain write


def load_head(path: PathLike) -> ClassificationHead:
    """A head written by `save_head` / `symerge convert` (normalize flag from the file's metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"head file '{path}' does not exist")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValidationError(f"head file '{path}': not a readable safetensors file ({err})") from None
    return head_from_state(state, normalize=meta.get("normalize", "false") == "true", owner=f"head file '{path}'")


# --- open_clip ViT -> Hugging Face CLIPVisionModelWithProjection -----------------------------------------------------


def find_openclip_prefix(state: Mapping[str, Tensor]) -> str:
    """Prefix of an open_clip ViT image tower in a state dict ('model.visual.' for task_vectors ImageEncoders)."""
    for prefix in OPENCLIP_PREFIXES + ("",):
        if f"{prefix}conv1.weight" in state and f"{prefix}class_embedding" in state:
            return prefix
    if any(".attnpool." in k or k.startswith("visual.attnpool") for k in state):
        raise ValidationError("open_clip ResNet image towers (ModifiedResNet) are not supported; only ViT towers")
    if any(k.startswith(("visual.trunk.", "model.visual.trunk.")) for k in state):
        raise ValidationError("open_clip timm image towers (visual.trunk.*) are not supported; only native ViT towers")
    raise ValidationError("not an open_clip ViT image tower: no 'visual.conv1.weight' / 'visual.class_embedding' "
                          f"(first keys: {list(state)[:5]})")


def openclip_to_hf_vision(
    state: Mapping[str, Tensor],
    num_heads: int | None = None,
    hidden_act: str = "quick_gelu",
    layer_norm_eps: float = 1e-5,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Map an open_clip ViT image tower onto `CLIPVisionModelWithProjection` tensor names.

    Accepts keys under 'visual.' (open_clip CLIP), 'model.visual.' (task_vectors ImageEncoder) or no prefix (a bare
    VisionTransformer); other keys (the text side) are ignored, unknown keys of the image tower are refused.
    Returns (HF state dict, `CLIPVisionConfig` kwargs). Heads = width / 64 (open_clip's head width) unless given;
    `hidden_act` is 'quick_gelu' for OpenAI-pretrained towers, 'gelu' for others (`symerge convert` records which).
    """
    prefix = find_openclip_prefix(state)
    tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if key not in tower:
            raise ValidationError(f"open_clip image tower: missing tensor '{prefix}{key}'")
        value = tower[key]
        if shape is not None and tuple(value.shape) != shape:
            raise ValidationError(f"open_clip image tower: tensor '{prefix}{key}' has shape {tuple(value.shape)}, expected {shape}")
        used.add(key)
        return value.detach().clone()

    conv = take("conv1.weight")
    if conv.dim() != 4 or conv.shape[2] != conv.shape[3]:
        raise ValidationError(f"open_clip image tower: '{prefix}conv1.weight' has shape {tuple(conv.shape)}, expected [width, C, p, p]")
    width, channels, patch = int(conv.shape[0]), int(conv.shape[1]), int(conv.shape[2])
    heads = num_heads if num_heads is not None else width // 64
    if heads < 1 or width % heads:
        raise ValidationError(f"open_clip image tower: width {width} is not divisible into heads of 64; pass num_heads")
    positions = take("positional_embedding")
    grid = math.isqrt(max(int(positions.shape[0]) - 1, 0))
    if positions.dim() != 2 or positions.shape[1] != width or grid * grid + 1 != positions.shape[0]:
        raise ValidationError(f"open_clip image tower: '{prefix}positional_embedding' has shape {tuple(positions.shape)}, "
                              f"expected [grid² + 1, {width}]")
    layers = sorted({int(m.group(1)) for k in tower if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise ValidationError(f"open_clip image tower: residual blocks {layers} are not numbered 0..N-1")
    hidden = int(tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]) if "transformer.resblocks.0.mlp.c_fc.weight" in tower else 4 * width

    out: dict[str, Tensor] = {
        "vision_model.embeddings.patch_embedding.weight": conv,
        "vision_model.embeddings.class_embedding": take("class_embedding", (width,)),
        "vision_model.embeddings.position_embedding.weight": positions,
        "vision_model.pre_layrnorm.weight": take("ln_pre.weight", (width,)),
        "vision_model.pre_layrnorm.bias": take("ln_pre.bias", (width,)),
        "vision_model.post_layernorm.weight": take("ln_post.weight", (width,)),
        "vision_model.post_layernorm.bias": take("ln_post.bias", (width,)),
    }
    for n in layers:
        src, dst = f"transformer.resblocks.{n}.", f"vision_model.encoder.layers.{n}."
        in_w = take(src + "attn.in_proj_weight", (3 * width, width))
        in_b = take(src + "attn.in_proj_bias", (3 * width,))
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), in_w.chunk(3), in_b.chunk(3)):
            out[f"{dst}self_attn.{name}.weight"] = w.clone()
            out[f"{dst}self_attn.{name}.bias"] = b.clone()
        pairs = [
            ("attn.out_proj.weight", "self_attn.out_proj.weight", (width, width)),
            ("attn.out_proj.bias", "self_attn.out_proj.bias", (width,)),
            ("ln_1.weight", "layer_norm1.weight", (width,)), ("ln_1.bias", "layer_norm1.bias", (width,)),
            ("ln_2.weight", "layer_norm2.weight", (width,)), ("ln_2.bias", "layer_norm2.bias", (width,)),
            ("mlp.c_fc.weight", "mlp.fc1.weight", (hidden, width)), ("mlp.c_fc.bias", "mlp.fc1.bias", (hidden,)),
            ("mlp.c_proj.weight", "mlp.fc2.weight", (width, hidden)), ("mlp.c_proj.bias", "mlp.fc2.bias", (width,)),
        ]
        for s, d, shape in pairs:
            out[dst + d] = take(src + s, shape)
    config: dict[str, Any] = {
        "hidden_size": width, "intermediate_size": hidden, "num_hidden_layers": len(layers),
        "num_attention_heads": heads, "num_channels": channels, "patch_size": patch, "image_size": grid * patch,
        "hidden_act": hidden_act, "layer_norm_eps": layer_norm_eps,
    }
    if "proj" in tower:
        proj = take("proj")
        if proj.dim() != 2 or proj.shape[0] != width:
            raise ValidationError(f"open_clip image tower: '{prefix}proj' has shape {tuple(proj.shape)}, expected [{width}, dim]")
        out["visual_projection.weight"] = proj.t().contiguous()
        config["projection_dim"] = int(proj.shape[1])
    unused = sorted(set(tower) - used)
    if unused:
        raise ValidationError(f"open_clip image tower: tensor '{prefix}{unused[0]}' has no Hugging Face CLIP counterpart "
                              "(unsupported variant, e.g. LayerScale or attentional pooling)")
    return out, config


def detect_hidden_act(classes: Mapping[str, str]) -> str | None:
    """'quick_gelu' / 'gelu' from the module classes of a pickled open_clip model (`safe_pickle.module_classes`)."""
    acts = [cls for path, cls in classes.items() if "visual" in path and re.search(r"resblocks\.\d+\.mlp\.", path + ".")]
    names = {cls.rsplit(".", 1)[-1] for cls in acts}
    if "QuickGELU" in names:
        return "quick_gelu"
    if "GELU" in names:
        return "gelu"
    return None


# --- the encoder -------------------------------------------------------------------------------------------------


class CLIPVisionEncoder(nn.Module):
    """pixel_values [B, C, H, W] -> CLIP image embeddings [B, projection_dim] (L2-normalised when `normalize`).

    Tensor names equal `CLIPVisionModelWithProjection`'s ('vision_model.*', 'visual_projection.weight'), so a merged
    state loads into that class directly (`to_hf`).
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Linear, config: Any, normalize: bool = True):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.config = config  # CLIPVisionConfig with projection_dim set
        self.normalize = normalize

    @property
    def embed_dim(self) -> int:
        return int(self.visual_projection.out_features)

    def forward(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        embeds = self.visual_projection(pooled)
        return F.normalize(embeds, dim=-1) if self.normalize else embeds

    @classmethod
    def from_hf(cls, model: nn.Module, normalize: bool = True) -> "CLIPVisionEncoder":
        """From a loaded `CLIPModel` or `CLIPVisionModelWithProjection` (shares its modules)."""
        from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

        if isinstance(model, CLIPModel):
            config = CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "projection_dim": model.config.projection_dim})
        elif isinstance(model, CLIPVisionModelWithProjection):
            config = model.config
        else:
            raise ValidationError(f"expected a CLIPModel or CLIPVisionModelWithProjection, got {type(model).__name__}")
        return cls(model.vision_model, model.visual_projection, config, normalize).eval()

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor], config: Mapping[str, Any], normalize: bool = True,
                   owner: str = "vision model") -> "CLIPVisionEncoder":
        """From an HF-named state dict and `CLIPVisionConfig` kwargs (e.g. `openclip_to_hf_vision`'s output)."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if "projection_dim" not in config:
            raise ValidationError(f"{owner}: no projection ('proj' / 'visual_projection.weight'): cannot produce CLIP embeddings")
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(config)))
        load_strict(model, state, owner)
        return cls.from_hf(model, normalize)

    def to_hf(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A `CLIPVisionModelWithProjection` holding `state` (default: this encoder's weights); `save_pretrained` it."""
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection(self.config)
        load_strict(model, state if state is not None else self.state_dict(), "encoder")
        return model.eval()


def _hf_quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_source(path: PathLike, what: str) -> str:
    """A local dir (must hold config.json) or a hub id ('org/name', for online use)."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValidationError(f"{what} '{path}' is not a Hugging Face model directory (no config.json)")
        return str(local)
    text = str(path)
    from symerge.models.hf_text import hub_source, looks_like_path

    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not looks_like_path(text):
        return hub_source(text, what)  # asked once; a cached snapshot when the hub cannot be reached
    raise ValidationError(f"{what} '{path}' does not exist")


def _model_type(source: str) -> str | None:
    config = Path(source) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise ValidationError(f"'{config}': invalid JSON ({err})") from None
    return None


def load_clip_model(path: PathLike | nn.Module) -> nn.Module:
    """A `CLIPModel` (text + vision) from a dir / hub id, float32, eval mode."""
    from transformers import CLIPModel

    if isinstance(path, nn.Module):
        if not isinstance(path, CLIPModel):
            raise ValidationError(f"expected a CLIPModel, got {type(path).__name__}")
        return path.eval()
    source = _model_source(path, "pretrained CLIP model")
    kind = _model_type(source)
    if kind not in (None, "clip"):
        raise ValidationError(f"pretrained CLIP model '{path}' has model_type '{kind}', expected 'clip' (a CLIPModel dir)")
    _hf_quiet()
    return CLIPModel.from_pretrained(source, dtype=torch.float32).eval()


def clip_vision_encoder(path: PathLike | nn.Module, normalize: bool = True) -> CLIPVisionEncoder:
    """Image encoder from a `CLIPModel` or `CLIPVisionModelWithProjection` dir (or loaded model).

    Output: image embeddings [B, projection_dim], L2-normalised unless `normalize=False` (zero-shot heads and
    task_vectors heads score normalised embeddings). A `CLIPVisionModel` dir has no projection: use it as an
    expert in `load_clip_pool` instead.
    """
    from transformers import CLIPVisionModelWithProjection

    if isinstance(path, nn.Module):
        return CLIPVisionEncoder.from_hf(path, normalize)
    source = _model_source(path, "CLIP model")
    if _model_type(source) in (None, "clip"):
        return CLIPVisionEncoder.from_hf(load_clip_model(source), normalize)
    _hf_quiet()
    model, info = CLIPVisionModelWithProjection.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValidationError(f"CLIP vision model '{path}': missing tensor '{missing[0]}' (a CLIPVisionModel without "
                              "projection? pass the pretrained CLIPModel dir and use it as an expert)")
    return CLIPVisionEncoder.from_hf(model.eval(), normalize)


def _vision_tower(model: nn.Module) -> nn.Module:
    """The vision transformer inside CLIPModel / CLIPVisionModel (transformers 4: `.vision_model`; 5: the model)."""
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else model


def load_clip_expert(path: PathLike | nn.Module, projection: Tensor, task: str) -> dict[str, Tensor]:
    """An expert's encoder state in `CLIPVisionEncoder` names. A `CLIPVisionModel` expert (FusionBench) keeps the
    pretrained `visual_projection`; a full `CLIPModel` expert brings its own."""
    from transformers import CLIPModel, CLIPVisionModel

    if isinstance(path, nn.Module):
        model = path
    else:
        source = _model_source(path, f"expert '{task}'")
        kind = _model_type(source)
        _hf_quiet()
        if kind == "clip":
            model = CLIPModel.from_pretrained(source, dtype=torch.float32)
        elif kind in (None, "clip_vision_model"):
            model = CLIPVisionModel.from_pretrained(source, dtype=torch.float32)
        else:
            raise ValidationError(f"expert '{task}' ('{path}') has model_type '{kind}', expected a CLIP vision model")
    state = {f"vision_model.{k}": v.detach() for k, v in _vision_tower(model).state_dict().items()}
    own_projection = getattr(model, "visual_projection", None)
    state["visual_projection.weight"] = (own_projection.weight if isinstance(own_projection, nn.Linear) else projection).detach()
    return state


# --- zero-shot heads ------------------------------------------------------------------------------------------------


def render_prompts(class_names: Sequence[str], templates: Sequence[Template]) -> list[list[str]]:
    """Prompts per class: str templates are formatted with the class name, callables are called with it."""
    if not class_names:
        raise ValidationError("zero-shot head: no class names")
    if not templates:
        raise ValidationError("zero-shot head: no prompt templates")
    rendered = []
    for name in class_names:
        if not isinstance(name, str) or not name.strip():
            raise ValidationError(f"zero-shot head: class name {name!r} must be a non-empty string")
        row = []
        for template in templates:
            if callable(template):
                row.append(str(template(name)))
            elif isinstance(template, str) and "{}" in template:
                row.append(template.format(name))
            else:
                raise ValidationError(f"zero-shot head: template {template!r} must be a string with '{{}}' or a callable")
        rendered.append(row)
    return rendered


def load_clip_tokenizer(model: nn.Module, path: PathLike | None = None) -> Any:
    from transformers import AutoTokenizer

    source = path if path is not None else getattr(model, "name_or_path", None)
    if not source:
        raise ValidationError("zero-shot head: pass `tokenizer=` (the CLIP model has no directory to load one from)")
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ValidationError(f"zero-shot head: no CLIP tokenizer in '{source}' ({err})") from None


def tensor_fingerprint(model: nn.Module, prefixes: Sequence[str]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors under `prefixes`."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key.startswith(tuple(prefixes)):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_prompts(model: nn.Module, tokens: Mapping[str, Tensor], batch_size: int, device: str | torch.device) -> Tensor:
    """Projected CLIP text embeddings [N, D] (float32, on CPU). Only the text tower visits `device` (and comes back),
    so a vision tower shared with an encoder stays where it is."""
    text_model, projection = model.text_model, model.text_projection
    home = next(text_model.parameters()).device
    was_training = text_model.training
    text_model.to(device).eval()
    projection.to(device)
    try:
        out = []
        for start in range(0, tokens["input_ids"].shape[0], batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            pooled = text_model(**batch).pooler_output
            out.append(projection(pooled).float().cpu())
    finally:
        text_model.to(home).train(was_training)
        projection.to(home)
    return torch.cat(out)


def head_cache_dir() -> Path:
    from symerge.data.fetch import cache_root

    return cache_root() / "heads"


def zero_shot_head(
    clip_model: PathLike | nn.Module,
    class_names: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    *,
    tokenizer: Any = None,
    cache: bool = True,
    cache_dir: PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> nn.Linear:
    """Zero-shot classifier from the CLIP text tower, as task_vectors' `build_classification_head` does.

    Per class: embed every prompt, L2-normalise, average, L2-normalise again; stack to [C, D] and multiply by
    `logit_scale.exp()`. Returns `nn.Linear(D, C)` (zero bias) to apply to L2-normalised image embeddings
    (`CLIPVisionEncoder` output). Cached under `cache_root()/heads/<sha256>.safetensors`, keyed by the text tower's
    weights, the tokenized prompts (so class names, templates and tokenizer) and the format version.
    """
    model = load_clip_model(clip_model)
    if tokenizer is None:
        tokenizer = load_clip_tokenizer(model, None if isinstance(clip_model, nn.Module) else _model_source(clip_model, "CLIP model"))
    prompts = render_prompts(list(class_names), list(templates))
    flat = [p for row in prompts for p in row]
    max_len = int(model.config.text_config.max_position_embeddings)
    tokens = dict(tokenizer(flat, padding=True, truncation=True, max_length=max_len, return_tensors="pt"))
    digest = hashlib.sha256()
    digest.update(f"symerge-zero-shot-head/{HEAD_CACHE_VERSION}|".encode())
    digest.update(tensor_fingerprint(model, ("text_model.", "text_projection.", "logit_scale")).encode())
    digest.update(json.dumps({"classes": list(class_names), "prompts": prompts}, ensure_ascii=False).encode())
    for key in ("input_ids", "attention_mask"):
        digest.update(tokens[key].to(torch.int64).numpy().tobytes())
    key = digest.hexdigest()
    root = Path(cache_dir) if cache_dir is not None else head_cache_dir()
    file = root / f"{key}.safetensors"
    if cache and file.is_file():
        try:
            head = load_head(file)
            if head.weight.shape[0] == len(class_names):
                return _plain_linear(head.weight, head.bias)
        except ValidationError:
            pass  # a corrupt cache entry is rebuilt below
    embeds = encode_prompts(model, tokens, batch_size, device)
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    per_class = embeds.view(len(class_names), len(templates), -1).mean(dim=1)
    weight = per_class / per_class.norm(dim=-1, keepdim=True) * model.logit_scale.detach().float().exp().cpu()
    head = _plain_linear(weight, torch.zeros(weight.shape[0]))
    if cache:
        from symerge.atomic import atomic_file

        with atomic_file(file) as tmp:
            save_head(head, tmp, {"classes": json.dumps(list(class_names)), "templates": str(len(templates))})
    return head


def _plain_linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.eval()


# --- pools ----------------------------------------------------------------------------------------------------------


def _check_head_classes(task: str, head: nn.Module | Mapping[str, Tensor], names: Sequence[str]) -> None:
    state = as_state_dict(head, f"head of task '{task}'")
    width = head_width(state)
    if width != len(names):
        last = [k for k, t in state.items() if t.dim() >= 1][-1]
        raise ValidationError(f"task '{task}': {len(names)} class names given, but head tensor '{last}' has width {width}")


def load_clip_pool(
    pretrained: PathLike | nn.Module,
    expert_dirs: Mapping[str, PathLike | nn.Module],
    class_names: Mapping[str, Sequence[str]] | None = None,
    templates: Sequence[Template] | Mapping[str, Sequence[Template]] = DEFAULT_TEMPLATES,
    *,
    heads: Mapping[str, nn.Module] | None = None,
    normalize: bool = True,
    cache: bool = True,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
) -> tuple[CLIPVisionEncoder, dict[str, nn.Module], ModelPool]:
    """FusionBench layout: a pretrained `CLIPModel` + one `CLIPVisionModel` dir per task.

    Heads: given ones (`heads`, e.g. converted task_vectors heads; their width must equal the class-name count when
    class names are given too), else zero-shot heads from `class_names[task]` and `templates` (one list for all
    tasks, or a dict task -> list). Returns (encoder, heads, pool); the pool's tensors use the encoder's names.
    """
    tasks = check_task_names(expert_dirs.keys())
    class_names = dict(class_names or {})
    given = dict(heads or {})
    for name, mapping in (("class names", class_names), ("head", given)):
        unknown = [t for t in mapping if t not in tasks]
        if unknown:
            raise ValidationError(f"{name} given for unknown task '{unknown[0]}'; tasks: {tasks}")
    if isinstance(templates, Mapping):
        unknown = [t for t in templates if t not in tasks]
        if unknown:
            raise ValidationError(f"templates given for unknown task '{unknown[0]}'; tasks: {tasks}")
    for task in tasks:
        if task not in given and task not in class_names:
            raise ValidationError(f"task '{task}': no head and no class names to build a zero-shot head from")
        if task in given and task in class_names:
            _check_head_classes(task, given[task], class_names[task])
    with subject("pretrained"):
        clip = load_clip_model(pretrained)
        encoder = CLIPVisionEncoder.from_hf(clip, normalize)
    base = {k: v.detach() for k, v in encoder.state_dict().items()}
    projection = base["visual_projection.weight"]
    experts: dict[str, dict[str, Tensor]] = {}
    for task in tasks:
        with subject("expert", task):
            state = load_clip_expert(expert_dirs[task], projection, task)
            owner = f"expert '{task}'" + ("" if isinstance(expert_dirs[task], nn.Module) else f" ('{expert_dirs[task]}')")
            _check_architecture(base, state, owner)
        experts[task] = {k: v.to(base[k].dtype) for k, v in state.items()}
    out_heads: dict[str, nn.Module] = {}
    for task in tasks:
        if task in given:
            out_heads[task] = given[task]
        else:
            task_templates = templates.get(task, DEFAULT_TEMPLATES) if isinstance(templates, Mapping) else templates
            out_heads[task] = zero_shot_head(clip, class_names[task], task_templates, tokenizer=tokenizer,
                                             cache=cache, device=device)
    pool = ModelPool.from_parts(base, experts, out_heads, {t: len(n) for t, n in class_names.items()})
    return encoder, out_heads, pool


def _check_architecture(base: Mapping[str, Tensor], state: Mapping[str, Tensor], owner: str) -> None:
    """Same tensor names and shapes as the pretrained encoder; the error names the first differing tensor."""
    try:
        check_same_layout({k: v for k, v in base.items()}, {k: v.to(base[k].dtype) if k in base else v for k, v in state.items()}, owner)
    except ValidationError as err:
        raise ValidationError(f"{err} — the expert's architecture differs from the pretrained CLIP vision tower") from None


def load_converted_pool(
    converted_dir: PathLike,
    tasks: Sequence[str] | None = None,
    normalize: bool = True,
    num_heads: int | None = None,
) -> tuple[CLIPVisionEncoder, dict[str, nn.Module], ModelPool]:
    """A pool from `symerge convert` output (task_vectors layout): open_clip towers mapped onto HF CLIP names,
    task_vectors heads as `ClassificationHead`s. Tasks need a finetuned model and a head (default: all such)."""
    from safetensors.torch import load_file

    root = Path(converted_dir)
    manifest_path = root / "convert.json"
    if not manifest_path.is_file():
        raise ValidationError(f"'{root}' has no convert.json: run `symerge convert` first")
    manifest = json.loads(manifest_path.read_text())
    complete = [t for t in manifest.get("experts", {}) if t in manifest.get("heads", {})]
    chosen = list(tasks) if tasks is not None else complete
    for task in chosen:
        if task not in manifest.get("experts", {}):
            raise ValidationError(f"task '{task}': no finetuned model in '{root}' (found: {sorted(manifest.get('experts', {}))})")
        if task not in manifest.get("heads", {}):
            raise ValidationError(f"task '{task}': no head in '{root}' (found: {sorted(manifest.get('heads', {}))})")
    pretrained_file = manifest.get("pretrained")
    if not pretrained_file:
        raise ValidationError(f"'{root}': no pretrained (zeroshot) model was converted")

    def hf_state(name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        info = manifest["files"][name]
        act = info.get("hidden_act") or "quick_gelu"
        state = load_file(str(root / name))
        try:
            return openclip_to_hf_vision(state, num_heads=num_heads, hidden_act=act)
        except ValidationError as err:
            raise ValidationError(f"'{root / name}': {err}") from None

    base_state, config = hf_state(pretrained_file)
    encoder = CLIPVisionEncoder.from_state(base_state, config, normalize, owner=str(root / pretrained_file))
    experts = {}
    for task in chosen:
        with subject("expert", task):
            state, expert_config = hf_state(manifest["experts"][task])
            if expert_config != config:
                diff = sorted(k for k in config if config.get(k) != expert_config.get(k))
                raise ValidationError(f"expert '{task}': architecture differs from the pretrained model ({diff[0]}: "
                                      f"{expert_config.get(diff[0])} vs {config.get(diff[0])})")
        experts[task] = state
    heads = {t: load_head(root / manifest["heads"][t]) for t in chosen}
    pool = ModelPool.from_parts(encoder.state_dict(), experts, heads)
    return encoder, dict(heads), pool
