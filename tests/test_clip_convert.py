"""open_clip ViT -> Hugging Face CLIP mapping (checked against a reference forward written from open_clip's module
structure), and the HF CLIP pool: pretrained CLIPModel + CLIPVisionModel experts + cached zero-shot heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symerge import ValidationError
from symerge.models import clip as clip_mod
from symerge.models.clip import (
    ClassificationHead,
    CLIPVisionEncoder,
    clip_vision_encoder,
    head_from_state,
    load_clip_pool,
    openclip_to_hf_vision,
    zero_shot_head,
)

WIDTH, LAYERS, PATCH, IMAGE, PROJ = 64, 2, 8, 32, 32


def openclip_state(prefix="visual.", width=WIDTH, layers=LAYERS, patch=PATCH, image=IMAGE, proj=PROJ, seed=0):
    """A random open_clip ViT image tower (names and shapes as open_clip's VisionTransformer)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    grid = image // patch
    sd = {
        "conv1.weight": rnd(width, 3, patch, patch),
        "class_embedding": rnd(width, scale=0.5),
        "positional_embedding": rnd(grid * grid + 1, width, scale=0.5),
        "ln_pre.weight": rnd(width, scale=0.1, shift=1.0), "ln_pre.bias": rnd(width, scale=0.1),
        "ln_post.weight": rnd(width, scale=0.1, shift=1.0), "ln_post.bias": rnd(width, scale=0.1),
        "proj": rnd(width, proj, scale=0.1),
    }
    for n in range(layers):
        b = f"transformer.resblocks.{n}."
        sd.update({
            b + "ln_1.weight": rnd(width, scale=0.1, shift=1.0), b + "ln_1.bias": rnd(width, scale=0.1),
            b + "attn.in_proj_weight": rnd(3 * width, width, scale=0.15), b + "attn.in_proj_bias": rnd(3 * width, scale=0.1),
            b + "attn.out_proj.weight": rnd(width, width, scale=0.1), b + "attn.out_proj.bias": rnd(width, scale=0.1),
            b + "ln_2.weight": rnd(width, scale=0.1, shift=1.0), b + "ln_2.bias": rnd(width, scale=0.1),
            b + "mlp.c_fc.weight": rnd(4 * width, width, scale=0.1), b + "mlp.c_fc.bias": rnd(4 * width, scale=0.1),
            b + "mlp.c_proj.weight": rnd(width, 4 * width, scale=0.1), b + "mlp.c_proj.bias": rnd(width, scale=0.1),
        })
    return {prefix + k: v for k, v in sd.items()}


def reference_forward(sd, images, heads, prefix="visual.", act="quick_gelu"):
    """open_clip VisionTransformer.forward, written from its modules: conv1 -> [CLS; patches] + pos -> ln_pre ->
    residual attention blocks (nn.MultiheadAttention on the fused in_proj, LND layout) -> ln_post(CLS) @ proj."""
    p = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    width = p["class_embedding"].shape[0]
    x = F.conv2d(images, p["conv1.weight"], stride=p["conv1.weight"].shape[-1])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = p["class_embedding"] + torch.zeros(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + p["positional_embedding"]
    x = F.layer_norm(x, (width,), p["ln_pre.weight"], p["ln_pre.bias"])
    x = x.permute(1, 0, 2)  # NLD -> LND
    n = 0
    while f"transformer.resblocks.{n}.ln_1.weight" in p:
        b = f"transformer.resblocks.{n}."
        attn = nn.MultiheadAttention(width, heads)
        attn.load_state_dict({"in_proj_weight": p[b + "attn.in_proj_weight"], "in_proj_bias": p[b + "attn.in_proj_bias"],
                              "out_proj.weight": p[b + "attn.out_proj.weight"], "out_proj.bias": p[b + "attn.out_proj.bias"]})
        y = F.layer_norm(x, (width,), p[b + "ln_1.weight"], p[b + "ln_1.bias"])
        x = x + attn(y, y, y, need_weights=False)[0]
        y = F.layer_norm(x, (width,), p[b + "ln_2.weight"], p[b + "ln_2.bias"])
        h = F.linear(y, p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
        x = x + F.linear(h, p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"])
        n += 1
    x = x.permute(1, 0, 2)
    pooled = F.layer_norm(x[:, 0, :], (width,), p["ln_post.weight"], p["ln_post.bias"])
    return pooled @ p["proj"]


def hf_model(hf_state, config):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()
    result = model.load_state_dict(hf_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.mark.parametrize("prefix,num_heads", [("visual.", None), ("model.visual.", 4)])
@torch.no_grad()
def test_openclip_vit_maps_onto_hf_clip_vision_and_matches_reference_forward(prefix, num_heads):
    sd = openclip_state(prefix)
    sd[prefix.replace("visual.", "") + "token_embedding.weight"] = torch.zeros(10, 8)  # text side: ignored
    hf_state, config = openclip_to_hf_vision(sd, num_heads=num_heads)
    heads = num_heads or WIDTH // 64
    assert config == {"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS,
                      "num_attention_heads": heads, "num_channels": 3, "patch_size": PATCH, "image_size": IMAGE,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": PROJ}
    assert torch.equal(hf_state["visual_projection.weight"], sd[prefix + "proj"].t())
    q = hf_state["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    v = hf_state["vision_model.encoder.layers.1.self_attn.v_proj.weight"]
    fused = sd[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(q, fused[:WIDTH]) and torch.equal(v, fused[2 * WIDTH:])
    model = hf_model(hf_state, config)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    got = model(pixel_values=images).image_embeds
    want = reference_forward(sd, images, heads, prefix)
    assert got.shape == (3, PROJ)
    assert want.abs().max() > 0.1  # a meaningful comparison, not two near-zero outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_gelu_towers_and_encoder_wrapper_normalise():
    sd = openclip_state()
    hf_state, config = openclip_to_hf_vision(sd, hidden_act="gelu")
    encoder = CLIPVisionEncoder.from_state(hf_state, config)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    want = reference_forward(sd, images, 1, act="gelu")
    torch.testing.assert_close(encoder(images), F.normalize(want, dim=-1), atol=1e-5, rtol=1e-5)
    raw = CLIPVisionEncoder.from_state(hf_state, config, normalize=False)
    torch.testing.assert_close(raw(images), want, atol=1e-5, rtol=1e-5)
    assert set(encoder.state_dict()) == set(hf_state)  # the encoder's names are CLIPVisionModelWithProjection's
    assert set(encoder.to_hf().state_dict()) == set(hf_state)


def test_unsupported_open_clip_variants_are_refused():
    sd = openclip_state()
    with pytest.raises(ValidationError, match="ls_1.gamma"):
        openclip_to_hf_vision({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(WIDTH)})
    with pytest.raises(ValidationError, match="ResNet"):
        openclip_to_hf_vision({"visual.attnpool.k_proj.weight": torch.ones(2, 2), "visual.conv1.weight": torch.ones(1)})
    with pytest.raises(ValidationError, match="not an open_clip ViT"):
        openclip_to_hf_vision({"encoder.weight": torch.ones(2)})
    bad = dict(sd)
    del bad["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    with pytest.raises(ValidationError, match="resblocks.1.mlp.c_proj.bias"):
        openclip_to_hf_vision(bad)
    with pytest.raises(ValidationError, match="pass num_heads"):
        openclip_to_hf_vision(openclip_state(width=48))


def test_task_vectors_head_format():
    weight, bias = torch.randn(5, 8), torch.randn(5)
    head = head_from_state({"weight": weight, "bias": bias}, normalize=True)
    assert isinstance(head, nn.Linear) and head.normalize
    x = torch.randn(4, 8)
    torch.testing.assert_close(head(x), F.linear(x / x.norm(dim=-1, keepdim=True), weight, bias))
    assert torch.equal(ClassificationHead(weight, None, normalize=False)(x), F.linear(x, weight))
    with pytest.raises(ValidationError, match="bias"):
        head_from_state({"weight": weight, "bias": torch.randn(4)})


# --- Hugging Face CLIP pool --------------------------------------------------------------------------------------


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]  # GPT-2 byte-level alphabet
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(vision_hidden=32, intermediate=64):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=intermediate, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=24,
    )


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    from transformers import CLIPModel, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = tiny_clip_config()
    model = CLIPModel(config).eval()
    model.save_pretrained(root / "pretrained")
    tiny_tokenizer().save_pretrained(root / "pretrained")
    experts = {}
    for i, task in enumerate(["cars", "dtd"]):
        expert = CLIPVisionModel(config.vision_config)
        tower = getattr(expert, "vision_model", expert)
        tower.load_state_dict(getattr(model.vision_model, "vision_model", model.vision_model).state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
        expert.save_pretrained(root / task)
        experts[task] = root / task
    other = CLIPVisionModel(tiny_clip_config(intermediate=48).vision_config)
    other.save_pretrained(root / "other_arch")
    return root, experts


CLASSES = {"cars": ["sedan", "truck", "van"], "dtd": ["striped", "dotted"]}


def test_clip_pool_loads_builds_cached_zero_shot_heads_and_merges(clip_dirs, tmp_path, monkeypatch):
    from transformers import CLIPModel

    from symerge.adaptive.merged_encoder import MergedEncoder

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    root, experts = clip_dirs
    encoder, heads, pool = load_clip_pool(root / "pretrained", experts, CLASSES, templates=["a photo of a {}.", "art of the {}."])
    assert pool.tasks == ["cars", "dtd"] and pool.num_classes == {"cars": 3, "dtd": 2}
    assert heads["cars"].weight.shape == (3, 24) and heads["dtd"].weight.shape == (2, 24)
    assert set(pool.experts["cars"]) == set(pool.pretrained) == set(encoder.state_dict())
    tv = pool.task_vectors()
    assert tv.vectors["vision_model.encoder.layers.0.mlp.fc1.weight"].abs().sum() > 0
    assert tv.vectors["visual_projection.weight"].abs().sum() == 0  # experts keep the pretrained projection

    clip = CLIPModel.from_pretrained(root / "pretrained").eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        feats = encoder(images)
        want = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=images).pooler_output), dim=-1)
        torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)
        # the zero-shot head, by hand: per-class mean of normalised prompt embeddings, normalised, × logit scale
        tok = tiny_tokenizer()(["a photo of a truck.", "art of the truck."], padding=True, return_tensors="pt")
        text = clip.text_projection(clip.text_model(**tok).pooler_output)
        mean = F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1) * clip.logit_scale.exp()
        torch.testing.assert_close(heads["cars"].weight[1], mean, atol=1e-5, rtol=1e-5)
        # merged encoder: the pool's names are the encoder's, so functional substitution works
        merged = MergedEncoder(encoder, tv, init=0.0)
        torch.testing.assert_close(merged(images), feats)

    cached = sorted((tmp_path / "cache" / "heads").glob("*.safetensors"))
    assert len(cached) == 2

    def no_encoding(*args, **kwargs):
        raise AssertionError("zero-shot head recomputed instead of loaded from the cache")

    monkeypatch.setattr(clip_mod, "encode_prompts", no_encoding)
    _, heads2, _ = load_clip_pool(root / "pretrained", experts, CLASSES, templates=["a photo of a {}.", "art of the {}."])
    assert torch.equal(heads2["cars"].weight, heads["cars"].weight)
    with pytest.raises(AssertionError, match="recomputed"):  # other templates: a different cache key
        zero_shot_head(root / "pretrained", CLASSES["dtd"], ["a photo of the {}."])


def test_clip_pool_validation(clip_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    root, experts = clip_dirs
    with pytest.raises(ValidationError, match=r"task 'cars': 2 class names given, but head tensor 'bias' has width 3"):
        load_clip_pool(root / "pretrained", experts, {"cars": ["a", "b"], "dtd": ["x", "y"]},
                       heads={"cars": nn.Linear(24, 3)})
    with pytest.raises(ValidationError, match=r"expert 'dtd'.*vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight"):
        load_clip_pool(root / "pretrained", {"cars": experts["cars"], "dtd": root / "other_arch"}, CLASSES)
    with pytest.raises(ValidationError, match="task 'dtd': no head and no class names"):
        load_clip_pool(root / "pretrained", experts, {"cars": CLASSES["cars"]})
    with pytest.raises(ValidationError, match="class names given for unknown task 'svhn'"):
        load_clip_pool(root / "pretrained", experts, {**CLASSES, "svhn": ["1"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="not a Hugging Face model directory"):
        load_clip_pool(root / "pretrained", {**experts, "svhn": tmp_path / "empty"}, {**CLASSES, "svhn": ["1"]})
    with pytest.raises(ValidationError, match="does not exist"):
        load_clip_pool(tmp_path / "missing", experts, CLASSES)
    with pytest.raises(ValidationError, match="no projection|missing tensor 'visual_projection.weight'"):
        clip_vision_encoder(experts["cars"])
    encoder = clip_vision_encoder(root / "pretrained")
    assert encoder(torch.randn(2, 3, 16, 16)).norm(dim=-1).sub(1).abs().max() < 1e-5
