"""OpenAI's original CLIP checkpoint layout: a full-size ViT-B/16 (random weights) loaded through load_model is
checked against an independent plain-PyTorch forward of the published architecture; sizes derived from shapes
alone (ViT-L/14 without building it); tokenizers; and the errors for ResNet, truncated, TorchScript and
incomplete files."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import pre_tokenizers

from patchsae import PatchSAEError, cli
from patchsae.models.clip import CLIP_MEAN, CLIP_STD
from patchsae.models.load import load_model
from patchsae.models.openai_format import (config_from_state_dict, convert_state_dict, load_openai_checkpoint,
                                          resolve_act)
from patchsae.models.templates import IMAGENET_TEMPLATES


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- an OpenAI-layout state dict, and the published forward pass written out by hand -------------------------
BLOCK_SHAPES = {  # OpenAI's ResidualAttentionBlock, for width w
    "ln_1.weight": lambda w: (w,), "ln_1.bias": lambda w: (w,),
    "attn.in_proj_weight": lambda w: (3 * w, w), "attn.in_proj_bias": lambda w: (3 * w,),
    "attn.out_proj.weight": lambda w: (w, w), "attn.out_proj.bias": lambda w: (w,),
    "ln_2.weight": lambda w: (w,), "ln_2.bias": lambda w: (w,),
    "mlp.c_fc.weight": lambda w: (4 * w, w), "mlp.c_fc.bias": lambda w: (4 * w,),
    "mlp.c_proj.weight": lambda w: (w, 4 * w), "mlp.c_proj.bias": lambda w: (w,),
}


def openai_shapes(*, width, layers, patch, image, text_width, text_layers, context, vocab, embed):
    """Key -> shape of an OpenAI ViT CLIP (`model.state_dict()` of clip.model.CLIP)."""
    grid = image // patch
    shapes = {
        "visual.class_embedding": (width,), "visual.conv1.weight": (width, 3, patch, patch),
        "visual.positional_embedding": (grid * grid + 1, width),
        "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,), "visual.proj": (width, embed),
        "token_embedding.weight": (vocab, text_width), "positional_embedding": (context, text_width),
        "ln_final.weight": (text_width,), "ln_final.bias": (text_width,), "text_projection": (text_width, embed),
        "logit_scale": (),
    }
    for prefix, w, n in (("visual.transformer.resblocks", width, layers), ("transformer.resblocks", text_width,
                                                                           text_layers)):
        for i in range(n):
            shapes.update({f"{prefix}.{i}.{k}": f(w) for k, f in BLOCK_SHAPES.items()})
    return shapes


def random_openai_sd(seed=0, **dims):
    """Random weights at sane scales: LayerNorm weights near 1, everything else std 0.02."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in openai_shapes(**dims).items():
        t = torch.randn(shape, generator=gen) * 0.02
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            t += 1.0
        sd[key] = t
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


def ref_block(x_BTD, sd, pre, mask_TT=None, act="quick_gelu"):
    """OpenAI's ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x)), QuickGELU (open_clip's GELU
    models: exact erf GELU), 64-wide heads."""
    B, T, D = x_BTD.shape
    H = D // 64
    h = F.layer_norm(x_BTD, (D,), sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"], 1e-5)
    qkv = h @ sd[pre + "attn.in_proj_weight"].T + sd[pre + "attn.in_proj_bias"]
    q, k, v = (t.reshape(B, T, H, 64).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / 8.0
    if mask_TT is not None:
        scores = scores + mask_TT
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    x_BTD = x_BTD + att @ sd[pre + "attn.out_proj.weight"].T + sd[pre + "attn.out_proj.bias"]
    h = F.layer_norm(x_BTD, (D,), sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"], 1e-5)
    h = h @ sd[pre + "mlp.c_fc.weight"].T + sd[pre + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x_BTD + h @ sd[pre + "mlp.c_proj.weight"].T + sd[pre + "mlp.c_proj.bias"]


@torch.no_grad()
def ref_image(sd, pixels_BCHW, act="quick_gelu"):
    """(embeddings, residual stream after every block) of OpenAI's VisionTransformer.forward."""
    conv = sd["visual.conv1.weight"]
    D = conv.shape[0]
    x = F.conv2d(pixels_BCHW, conv, stride=conv.shape[-1])
    x = x.reshape(x.shape[0], D, -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, D)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (D,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    outs = []
    n = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(n):
        x = ref_block(x, sd, f"visual.transformer.resblocks.{i}.", act=act)
        outs.append(x)
    pooled = F.layer_norm(x[:, 0], (D,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return pooled @ sd["visual.proj"], outs


@torch.no_grad()
def ref_text(sd, ids_BT):
    """OpenAI's CLIP.encode_text: causal blocks, ln_final, the end-of-text row (argmax of ids) @ projection."""
    T = ids_BT.shape[1]
    D = sd["ln_final.weight"].shape[0]
    x = sd["token_embedding.weight"][ids_BT] + sd["positional_embedding"][:T]
    mask = torch.full((T, T), float("-inf")).triu(1)
    n = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(n):
        x = ref_block(x, sd, f"transformer.resblocks.{i}.", mask)
    x = F.layer_norm(x, (D,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(x.shape[0]), ids_BT.argmax(-1)] @ sd["text_projection"]


def hf_text(model, ids_BT):
    out = model.hf.get_text_features(input_ids=ids_BT)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---- full-size ViT-B/16 --------------------------------------------------------------------------------------
B16 = dict(width=768, layers=12, patch=16, image=224, text_width=512, text_layers=3, context=77, vocab=49408,
           embed=512)


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    """A B/16 in OpenAI's layout saved as .pt (plain dict) and as .safetensors, the .pt loaded via load_model."""
    folder = tmp_path_factory.mktemp("openai_b16")
    sd = random_openai_sd(seed=1, **B16)
    sd["input_resolution"] = torch.tensor(224)  # scalars some files carry; must be ignored
    sd["context_length"] = torch.tensor(77)
    sd["vocab_size"] = torch.tensor(49408)
    torch.save(sd, folder / "ViT-B-16.pt")
    save_file(sd, str(folder / "ViT-B-16.safetensors"))
    return sd, folder, load_model(str(folder / "ViT-B-16.pt"))


def test_b16_config_and_wrapper(b16):
    _, _, model = b16
    assert model.n_layers == 12 and model.d_model == 768
    vc, tc = model.hf.config.vision_config, model.hf.config.text_config
    assert (vc.patch_size, vc.image_size, vc.num_attention_heads, vc.intermediate_size) == (16, 224, 12, 3072)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.vocab_size) == (512, 3, 8, 49408)
    assert model.hf.config.projection_dim == 512
    assert vc.hidden_act == tc.hidden_act == "quick_gelu"
    assert model.layout().grid == (14, 14) and model.layout().n_tokens == 197
    assert model.preprocess.size == 224
    assert model.preprocess.mean == CLIP_MEAN and model.preprocess.std == CLIP_STD
    assert model.templates == tuple(IMAGENET_TEMPLATES)
    assert abs(model.hf.logit_scale.item() - 4.6052) < 1e-6


def test_b16_image_side_matches_independent_forward(b16):
    sd, _, model = b16
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    want_emb, want_blocks = ref_image(sd, x)
    got_emb = model.image_features(x)
    assert got_emb.shape == (2, 512)
    assert max_diff(got_emb, want_emb) <= 1e-4
    h = model.block_output(x, -2)  # block 11 of 12 = output of resblock 10
    assert h.shape == (2, 197, 768)
    assert max_diff(h, want_blocks[10]) <= 1e-4
    assert max_diff(h, want_blocks[9]) > 1e-2  # a neighbouring block would not pass
    assert max_diff(model.block_output(x, 3), want_blocks[3]) <= 1e-4
    assert max_diff(model.finish_from(h, -2), want_emb) <= 1e-4


def test_b16_text_tower_matches_independent_forward(b16):
    sd, _, model = b16
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 49406, (3, 12), generator=gen)
    ids[:, 0] = 49406  # <|startoftext|>
    ids[0, -1] = 49407  # <|endoftext|> at the end,
    ids[1, 5], ids[1, 6:] = 49407, 0  # or earlier, zero-padded after it as OpenAI's tokenize does
    ids[2, 9], ids[2, 10:] = 49407, 0
    got = hf_text(model, ids)
    want = ref_text(sd, ids)
    assert got.shape == (3, 512)
    assert max_diff(got, want) <= 1e-4
    # pooling really follows the end-of-text position
    assert max_diff(got[1], ref_text(sd, ids[1:2, :7])[0]) <= 1e-4


def test_b16_without_tokenizer_text_is_one_clear_error(b16):
    _, folder, model = b16
    with pytest.raises(PatchSAEError) as info:
        model.text_features(["a photo of a cat."])
    msg = str(info.value)
    assert "tokenizer" in msg and "\n" not in msg and "ViT-B-16.pt" in msg


def test_b16_safetensors_gives_the_same_model(b16):
    _, folder, model = b16
    other = load_model(str(folder / "ViT-B-16.safetensors"))
    a, b = model.hf.state_dict(), other.hf.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- open_clip's plain-GELU ViTs --------------------------------------------------------------------------------
GELU_B16 = dict(B16, layers=2, text_width=128, text_layers=1, vocab=300)  # B/16 vision at full width, 2 blocks


@pytest.fixture(scope="module")
def gelu_b16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openclip_gelu")
    sd = random_openai_sd(seed=3, **GELU_B16)
    torch.save(sd, folder / "laion-b16.pt")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    return sd, folder, x


def test_gelu_checkpoint_with_act_gelu_matches_an_independent_gelu_forward(gelu_b16, capsys):
    sd, folder, x = gelu_b16
    model = load_model(str(folder / "laion-b16.pt"), act="gelu")
    assert capsys.readouterr().err == ""  # the activation was given: nothing assumed
    assert model.hf.config.vision_config.hidden_act == model.hf.config.text_config.hidden_act == "gelu"
    want_emb, want_blocks = ref_image(sd, x, act="gelu")
    quick_emb, _ = ref_image(sd, x, act="quick_gelu")
    assert max_diff(model.image_features(x), want_emb) <= 1e-4
    assert max_diff(model.block_output(x, 0), want_blocks[0]) <= 1e-4
    assert max_diff(quick_emb, want_emb) > 1e-3  # the activation matters at this size: QuickGELU would fail


def test_open_clip_config_beside_the_file_decides_the_activation(gelu_b16, tmp_path, capsys):
    sd, folder, x = gelu_b16
    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 2, "width": 768, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 300, "width": 128, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    try:
        model = load_model(str(folder / "laion-b16.pt"))
        assert model.hf.config.vision_config.hidden_act == "gelu" and capsys.readouterr().err == ""
        assert max_diff(model.image_features(x), ref_image(sd, x, act="gelu")[0]) <= 1e-4
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**cfg, "quick_gelu": True}}))
        assert resolve_act(folder / "laion-b16.pt") == "quick_gelu"
        timm = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "timm_model_name": "vit_base_patch16_siglip_224"}}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": timm}))
        with pytest.raises(PatchSAEError, match="timm_model_name"):
            resolve_act(folder / "laion-b16.pt")
    finally:
        (folder / "open_clip_config.json").unlink()
    (tmp_path / "ViT-B-16-laion2b.json").write_text(json.dumps(cfg))  # open_clip model_configs style: <stem>.json
    assert resolve_act(tmp_path / "ViT-B-16-laion2b.pt") == "gelu"


def test_activation_from_the_name_or_assumed_in_one_line(tmp_path, capsys):
    assert resolve_act(tmp_path / "ViT-B-32-quickgelu.pt") == "quick_gelu"
    assert resolve_act(tmp_path / "ViT-L-14.pt") == "quick_gelu"  # OpenAI's own release file name
    assert capsys.readouterr().err == ""
    assert resolve_act(tmp_path / "my-model.pt") == "quick_gelu"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "assuming QuickGELU" in err and "act='gelu'" in err
    with pytest.raises(PatchSAEError, match="act must be one of"):
        resolve_act(tmp_path / "my-model.pt", "relu")


# ---- sizes from shapes alone -----------------------------------------------------------------------------------
def test_l14_config_from_shapes_only():
    shapes = openai_shapes(width=1024, layers=24, patch=14, image=224, text_width=768, text_layers=12, context=77,
                           vocab=49408, embed=768)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = config_from_state_dict(sd)
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads) == (1024, 24, 16)
    assert (vc.patch_size, vc.image_size, vc.intermediate_size) == (14, 224, 4096)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.intermediate_size) == (768, 12, 12, 3072)
    assert (tc.max_position_embeddings, tc.vocab_size, tc.eos_token_id) == (77, 49408, 49407)
    assert cfg.projection_dim == 768
    assert vc.hidden_act == tc.hidden_act == "quick_gelu" and vc.layer_norm_eps == tc.layer_norm_eps == 1e-5
    # every converted tensor lands on a CLIPModel parameter of the same shape (built on meta: no memory)
    from transformers import CLIPModel

    with torch.device("meta"):
        hf = CLIPModel(cfg)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in convert_state_dict(sd).items()}
    assert got == want


@pytest.mark.parametrize("patch,image", [(32, 224), (14, 336)])
def test_other_vit_sizes_from_shapes(patch, image):
    shapes = openai_shapes(width=64, layers=2, patch=patch, image=image, text_width=128, text_layers=1, context=77,
                           vocab=1000, embed=32)
    cfg = config_from_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert (cfg.vision_config.patch_size, cfg.vision_config.image_size) == (patch, image)
    assert (cfg.vision_config.num_attention_heads, cfg.text_config.num_attention_heads) == (1, 2)


# ---- small checkpoints: wrappers, dtypes, tokenizers ----------------------------------------------------------
SMALL = dict(width=64, layers=2, patch=8, image=32, text_width=64, text_layers=2, context=77, vocab=600, embed=32)


def write_clip_bpe(folder):
    """A small CLIP-style BPE (vocab.json + merges.txt): byte symbols, their word-final forms, a few merges,
    then <|startoftext|> and <|endoftext|> last, as in CLIP's own vocabulary."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["c a", "ca t</w>", "p h", "ph o", "pho t", "phot o</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(tokens)


def test_tokenizer_beside_checkpoint_drives_text_features(tmp_path):
    sd = random_openai_sd(seed=3, **SMALL)
    torch.save(sd, tmp_path / "clip.pt")
    n_tokens = write_clip_bpe(tmp_path)
    model = load_model(str(tmp_path / "clip.pt"))
    tok = model.tokenizer
    assert tok.eos_token_id == n_tokens - 1 < SMALL["vocab"] - 1  # EOS is not the embedding's last row here
    prompts = ["a photo of a cat", "cat"]
    got = model.text_features(prompts)
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
        assert max_diff(got[i], ref_text(sd, ids)[0]) <= 1e-4
    assert model.text_head(["cat", "dog"], ["a photo of a {}."]).shape == (2, 32)


def test_tokenizer_folder_argument(tmp_path, tiny_clip_dir):
    sd = random_openai_sd(seed=4, **SMALL)
    save_file(sd, str(tmp_path / "clip.safetensors"))
    model = load_model(str(tmp_path / "clip.safetensors"), tokenizer=str(tiny_clip_dir))
    ids = torch.tensor([model.tokenizer("zebra 42")["input_ids"]])
    assert max_diff(model.text_features(["zebra 42"])[0], ref_text(sd, ids)[0]) <= 1e-4
    with pytest.raises(PatchSAEError):
        load_model(str(tmp_path / "clip.safetensors"), tokenizer=str(tmp_path / "no-tokenizer"))


def test_nested_prefixed_fp16_checkpoint(tmp_path):
    sd = random_openai_sd(seed=5, **SMALL)
    plain, _ = load_openai_checkpoint(_save(tmp_path / "plain.pt", sd))
    half = {f"module.{k}": v.half() for k, v in sd.items()}
    for wrapper in ("state_dict", "model"):
        model, tok = load_openai_checkpoint(_save(tmp_path / f"{wrapper}.pth", {wrapper: half, "epoch": 3}))
        assert tok is None
        params = model.state_dict()
        assert all(v.dtype == torch.float32 for v in params.values() if v.is_floating_point())
        w = "vision_model.encoder.layers.1.self_attn.v_proj.weight"
        assert torch.equal(params[w], sd["visual.transformer.resblocks.1.attn.in_proj_weight"][128:].half().float())
        assert torch.allclose(params[w], plain.state_dict()[w], atol=1e-3)
        assert not torch.allclose(params[w], plain.state_dict()[w.replace("v_proj", "k_proj")], atol=1e-3)


def _save(path, obj):
    torch.save(obj, path)
    return path


# ---- errors ------------------------------------------------------------------------------------------------------
def _one_line_error(fn, *fragments):
    with pytest.raises(PatchSAEError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_resnet_checkpoint_is_refused(tmp_path):
    sd = random_openai_sd(seed=6, **SMALL)
    sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    sd.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
               "visual.layer1.0.conv1.weight": torch.zeros(64, 32, 1, 1),
               "visual.attnpool.positional_embedding": torch.zeros(50, 2048)})
    _one_line_error(lambda: config_from_state_dict(sd), "ResNet", "ViT")
    _one_line_error(lambda: convert_state_dict(sd), "ViT")
    _one_line_error(lambda: load_model(str(_save(tmp_path / "RN50.pt", sd))), "ViT")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    sd = random_openai_sd(seed=7, **SMALL)
    path = tmp_path / f"clip{suffix}"
    torch.save(sd, path) if suffix == ".pt" else save_file(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: load_model(str(path)), str(path))


def test_missing_and_unknown_keys(tmp_path):
    sd = random_openai_sd(seed=8, **SMALL)
    gone = "visual.transformer.resblocks.1.mlp.c_fc.bias"
    missing = {k: v for k, v in sd.items() if k != gone}
    _one_line_error(lambda: convert_state_dict(missing), "missing", gone)
    _one_line_error(lambda: load_model(str(_save(tmp_path / "missing.pt", missing))), gone)
    # a whole block gone in the middle is reported, not silently dropped
    no_block = {k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.0.")}
    _one_line_error(lambda: convert_state_dict(no_block), "transformer.resblocks.0.")
    extra = {**sd, "visual.adapter.weight": torch.zeros(3)}
    _one_line_error(lambda: convert_state_dict(extra), "unknown", "visual.adapter.weight")
    _one_line_error(lambda: config_from_state_dict({"foo": torch.zeros(1)}), "visual.conv1.weight")
    wrong = {**sd, "visual.proj": torch.zeros(64, 16)}  # embed dim disagrees with text_projection
    _one_line_error(lambda: load_model(str(_save(tmp_path / "wrong.pt", wrong))), "wrong.pt")


def test_not_a_state_dict_and_torchscript_refused(tmp_path):
    _one_line_error(lambda: load_model(str(_save(tmp_path / "list.pt", [torch.zeros(2)]))), "state dict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)).save(str(tmp_path / "jit.pt"))
    _one_line_error(lambda: load_model(str(tmp_path / "jit.pt")), "TorchScript", "safetensors")
    _one_line_error(lambda: load_model(str(tmp_path / "absent.pt")), "absent.pt")


# ---- command line ------------------------------------------------------------------------------------------------
def test_models_subcommand_lists_sources(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    sources, families = out.strip().split("\n\n")
    assert len(sources.splitlines()) == 4
    for fragment in ("embedded", "openai/clip-vit-base-patch16", ".pt", ".safetensors", "open_clip", "OpenAI"):
        assert fragment in sources
    rows = families.splitlines()
    assert [r.split()[0] for r in rows] == ["family", "clip", "siglip", "dinov2", "dinov2-registers"]
    assert "register" in rows[4] and "linear probe" in rows[4]
    assert "sigmoid" in rows[2] and "no class token" in rows[2]


def test_adapt_takes_act_like_the_other_stages(tmp_path, capsys):
    """`adapt --act gelu` opens an OpenAI-layout file as GELU (its model is named 'FILE [gelu]', as caches and
    SAEs name it) and records the choice; without --act the one-line QuickGELU assumption is printed."""
    from patchsae import cli

    sd = random_openai_sd(seed=5, **SMALL)
    torch.save(sd, tmp_path / "clip.pt")
    write_clip_bpe(tmp_path)
    args = ["adapt", "--model", str(tmp_path / "clip.pt"), "--dataset", "fashion-mnist", "--shots", "1",
            "--epochs", "1", "--batch-size", "5", "--max-eval-images", "4"]
    assert cli.main([*args, "--act", "gelu", "--out", str(tmp_path / "g")]) == 0
    out, err = capsys.readouterr()
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["options"]["act"] == "gelu" and f"{tmp_path / 'clip.pt'} [gelu]" in out
    assert "assum" not in err.lower()
    assert cli.main([*args, "--out", str(tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert "[gelu]" not in out and "assuming QuickGELU" in err
