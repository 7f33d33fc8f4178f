"""Generated hostile input for every loader a user can point at a file (issue 17): images, safetensors (SAE
folders, training checkpoints, MaPLe prompts), JSON configs and manifests, activation caches, and pickled
checkpoints (OpenAI `.pt`, MaPLe `.pth.tar`) including payloads that would run code when unpickled.

Every case must end in a correct load (checked against an independent read of the same bytes) or one
PatchSAEError line that gives no unsafe advice; it must write nothing (the case folder is unchanged) and run no
payload (the sentinel folder every payload aims at stays empty). `make fuzz` runs 1,000 cases per test function
(PATCHSAE_FUZZ=full); `make test` runs this file's fixed-seed short version.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from fuzzing import (PAYLOADS, contained, count, json_values, load_or_error, mutated, mutated_json,
                     payload_object, payload_pickle, torch_bytes, write_counts)
from patchsae.activations.cache import FORMAT, ActivationCache
from patchsae.activations.tokens import CachedTokens
from patchsae.data.base import SkipLog, iter_batches
from patchsae.data.folder import IMAGE_SUFFIXES, ImageFolder
from patchsae.models.clip import Preprocess
from patchsae.sae.checkpoint import load_sae, load_training_state, save_sae, save_training_state
from patchsae.sae.model import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    write_counts()


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """(root for case folders, sentinel folder that every payload aims at)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "sentinel").mkdir()
    (root / "cases").mkdir()
    return root / "cases", root / "sentinel"


def case_dir(arena) -> Path:
    return Path(tempfile.mkdtemp(dir=arena[0]))


def run_case(arena, family: str, files: dict[str, bytes], load):
    """Write the case's files into a fresh folder, run `load(folder)` under the contract, clean up."""
    count(family)
    folder = case_dir(arena)
    try:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        with contained(folder, arena[1]):
            return load_or_error(lambda: load(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- images -------------------------------------------------------------------------------------------------

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp",
           "PPM": ".ppm"}
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"]


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes): random bytes; or a real encoding of a small image in some mode, then mutated; or a PNG
    whose header declares a huge size (with a valid header checksum, so only the size is a lie); or a valid
    strip of up to 200,000 x 1 pixels."""
    kind = draw(st.sampled_from(["random", "encoded", "encoded", "huge", "strip"]))
    suffix = draw(st.sampled_from(sorted(IMAGE_SUFFIXES)))
    if kind == "random":
        return suffix, draw(st.binary(max_size=256))
    if kind == "strip":  # a few KB that decode to an extreme aspect ratio (preprocessing must stay bounded)
        long, short = draw(st.integers(1000, 200_000)), draw(st.integers(1, 3))
        size = (short, long) if draw(st.booleans()) else (long, short)
        buf = io.BytesIO()
        Image.new("L", size, draw(st.integers(0, 255))).save(buf, format="PNG")
        return ".png", buf.getvalue()
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(st.sampled_from(MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this format cannot store this mode: store RGB instead
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format=fmt)
    data = buf.getvalue()
    if kind == "huge" or fmt == "PNG" and draw(st.booleans()):
        data = _png_size_lie(img, draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
        return ".png", data
    return draw(st.sampled_from([FORMATS[fmt], suffix])), draw(mutated(data))


def _png_size_lie(img: Image.Image, w: int, h: int) -> bytes:
    import struct
    import zlib

    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@given(image_files())
def test_fuzz_image_folder(arena, case):
    """An image folder with one generated file: it decodes to one finite 28 px batch, or it is skipped and
    counted; the run itself never fails."""
    suffix, data = case

    def load(folder):
        ds = ImageFolder(folder / "root")
        skips = SkipLog()
        batches = list(iter_batches(ds, Preprocess(28), 4, skips=skips))
        return batches, skips

    (result, err) = run_case(arena, "images", {f"root/cls/x{suffix}": data}, load)
    assert err is None, err
    batches, skips = result
    if batches:
        (pixels, labels, idx), = batches
        assert pixels.shape == (1, 3, 28, 28) and torch.isfinite(pixels).all() and skips.count == 0
    else:
        assert skips.count == 1


@given(image_files())
def test_fuzz_explorer_upload(arena, case):
    """The explorer's upload decoding: an image that preprocesses to one finite 28 px tensor, or one line
    (NotAnImage, a PatchSAEError: the server answers 415)."""
    from patchsae.explorer.session import decode_upload

    _, data = case

    def load(folder):
        x = Preprocess(28)([decode_upload(data)])
        assert x.shape == (1, 3, 28, 28) and torch.isfinite(x).all()

    run_case(arena, "images", {}, load)


# ---- safetensors: SAE folders and training checkpoints ------------------------------------------------------

SAE_CFG = SAEConfig(d_model=4, d_sae=8)
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X9", ""]


def _sae_files() -> dict[str, bytes]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        save_sae(d, SAE(SAE_CFG), {"trained_on": "fuzz"})
        return {n: (Path(d) / n).read_bytes() for n in ("model.safetensors", "config.json")}


SAE_FILES = _sae_files()


@st.composite
def safetensors_lies(draw, data: bytes) -> bytes:
    """A valid safetensors file with its JSON header edited: dtype, shape or offsets lie, keys duplicated,
    entries added or removed, metadata of any shape; or the 8-byte header length lies; or bytes are damaged."""
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8: 8 + n]), data[8 + n:]
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "duplicate", "extra", "remove", "metadata",
                                 "length", "bytes", "any"]))
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    text = None
    if kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(DTYPES))
    elif kind == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4) | json_values(4))
    elif kind == "offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-5, len(body) + 10**12), min_size=0, max_size=3))
    elif kind == "duplicate":
        entry = json.dumps(header[draw(st.sampled_from(names))])
        inner = json.dumps(header)[1:-1]
        text = "{" + f"{json.dumps(name)}: {entry}, " + inner + "}"
    elif kind == "extra":
        header[draw(st.text(max_size=10))] = draw(json_values(4))
    elif kind == "remove":
        del header[name]
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values(4))
    if kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + data[8:]
    if kind == "bytes":
        return draw(mutated(data))
    if kind == "any":
        text = json.dumps(draw(json_values()))
    raw = (text if text is not None else json.dumps(header)).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _same_as_file(module_state: dict, path: Path, prefix: str = "") -> None:
    """A load is correct when it holds what the safetensors library itself reads from the file."""
    ref = load_file(str(path))
    for k, v in module_state.items():
        assert torch.equal(v, ref[prefix + k].to(v.dtype)), k


@given(safetensors_lies(SAE_FILES["model.safetensors"]), st.sampled_from([None, 4, 5]))
def test_fuzz_sae_weights(arena, weights, d_model):
    def load(folder):
        sae, meta = load_sae(folder, d_model)
        _same_as_file(sae.state_dict(), folder / "model.safetensors")
        return sae

    run_case(arena, "safetensors", {**SAE_FILES, "model.safetensors": weights}, load)


def _training_bytes() -> bytes:
    torch.manual_seed(0)
    sae = SAE(SAE_CFG)
    opt = torch.optim.Adam(sae.parameters())
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    with tempfile.TemporaryDirectory() as d:
        save_training_state(Path(d) / "c.safetensors", sae, opt, torch.arange(8), 7, {"epoch": 0})
        return (Path(d) / "c.safetensors").read_bytes()


TRAINING_BYTES = _training_bytes()


@st.composite
def training_checkpoints(draw) -> bytes:
    """Header lies as for weights, or the metadata (step, optimiser scalars, info) replaced by anything."""
    if draw(st.booleans()):
        return draw(safetensors_lies(TRAINING_BYTES))
    n = int.from_bytes(TRAINING_BYTES[:8], "little")
    header = json.loads(TRAINING_BYTES[8: 8 + n])
    meta = header["__metadata__"]
    key = draw(st.sampled_from(sorted(meta)))
    value = draw(json_values(6))
    meta[key] = value if draw(st.booleans()) and isinstance(value, str) else json.dumps(value)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + TRAINING_BYTES[8 + n:]


@given(training_checkpoints())
def test_fuzz_training_checkpoint(arena, data):
    """A resumed run: either the state loads and one Adam step on it gives finite weights, or one error line."""
    def load(folder):
        sae = SAE(SAE_CFG)
        opt = torch.optim.Adam(sae.parameters())
        step, since_fired_S, info = load_training_state(folder / "c.safetensors", sae, opt)
        _same_as_file(sae.state_dict(), folder / "c.safetensors", "model.")
        assert step >= 0 and since_fired_S.shape == (8,) and isinstance(info, dict)
        for p in sae.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        assert all(torch.isfinite(p).all() for p in sae.parameters())

    run_case(arena, "safetensors", {"c.safetensors": data}, load)


# ---- JSON: the SAE config ----------------------------------------------------------------------------------

@given(mutated_json(json.loads(SAE_FILES["config.json"])) | mutated_json({"sae": SAE_CFG.to_json()}).map(
    lambda b: json.dumps({"sae": json.loads(b)}).encode() if b.startswith(b"{") and _is_json(b) else b))
def test_fuzz_sae_config(arena, config):
    """config.json of an SAE folder: a load gives an SAE whose config has the declared types, or one line."""
    def load(folder):
        sae, meta = load_sae(folder)
        cfg = sae.cfg
        assert isinstance(cfg.d_model, int) and isinstance(cfg.d_sae, int) and isinstance(cfg.arch, str)
        assert all(isinstance(getattr(cfg, f), float) for f in ("l1_coeff", "aux_coeff", "bandwidth"))
        return sae

    run_case(arena, "json", {**SAE_FILES, "config.json": config}, load)


def _is_json(b: bytes) -> bool:
    try:
        json.loads(b)
        return True
    except ValueError:
        return False


# ---- activation caches --------------------------------------------------------------------------------------

def _cache_files() -> dict[str, bytes]:
    """A valid 3-shard cache (7 images, 5 tokens, width 3) in the on-disk format of activations/cache.py."""
    rng = np.random.default_rng(0)
    files, shards, n_per = {}, [], [3, 3, 1]
    for k, n in enumerate(n_per):
        for suffix, arr in ((".npy", rng.standard_normal((n, 5, 3)).astype(np.float16)),
                            (".index.npy", np.stack([np.arange(n) + 3 * k, np.arange(n) % 2], 1).astype(np.int64))):
            buf = io.BytesIO()
            np.save(buf, arr)
            files[f"shard_{k:05d}{suffix}"] = buf.getvalue()
        shards.append({"file": f"shard_{k:05d}.npy", "index_file": f"shard_{k:05d}.index.npy", "n_images": n})
    files["manifest.json"] = json.dumps({
        "format": FORMAT, "model": "fuzz", "layer": 1, "d_model": 3, "dataset": "fuzz", "split": "train",
        "max_images": None, "class_names": ["a", "b"],
        "layout": {"n_cls": 1, "n_prompt": 0, "grid": [2, 2], "kinds": ["cls"] + ["patch"] * 4},
        "n_tokens_per_image": 5, "dtype": "float16", "n_images": sum(n_per), "shards": shards, "skipped": []}).encode()
    return files


CACHE_FILES = _cache_files()


@st.composite
def caches(draw) -> dict[str, bytes]:
    """The valid cache with its manifest mutated, a shard or index damaged, replaced by another array (dtype,
    shape, an object array), or removed."""
    files = dict(CACHE_FILES)
    kind = draw(st.sampled_from(["manifest", "manifest", "bytes", "array", "remove", "none"]))
    name = draw(st.sampled_from(sorted(f for f in files if f != "manifest.json")))
    if kind == "manifest":
        files["manifest.json"] = draw(mutated_json(json.loads(CACHE_FILES["manifest.json"])))
    elif kind == "bytes":
        files[name] = draw(mutated(files[name]))
    elif kind == "remove":
        del files[name]
    elif kind == "array":
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
        dtype = draw(st.sampled_from(["float16", "float32", "int64", "int8", "bool", "object", "<U2"]))
        arr = np.zeros(shape, dtype=dtype)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        files[name] = buf.getvalue()
    return files


@given(caches())
def test_fuzz_activation_cache(arena, files):
    """A load reads every image (equal to what NumPy reads from the shard files) and yields token batches."""
    def load(folder):
        cache = ActivationCache(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        ref = np.concatenate([np.load(folder / s["file"]) for s in manifest["shards"]])
        assert np.array_equal(cache.images(0, cache.n_images), ref, equal_nan=True)
        batch = next(CachedTokens(cache, "all", seed=0).batches(8))
        assert batch.shape == (8, cache.d_model)
        return cache

    run_case(arena, "caches", files, load)


# ---- pickled checkpoints ------------------------------------------------------------------------------------

def _tiny_openai_sd():
    from test_openai_format import random_openai_sd

    return random_openai_sd(width=64, layers=1, patch=4, image=8, text_width=64, text_layers=1, context=8,
                            vocab=16, embed=8)


@st.composite
def pickled(draw, base: dict, sentinel: Path) -> bytes:
    """A pickled file: the base object (optionally wrapped, keys or values changed), a payload that would run
    code embedded in it or on its own, or damaged bytes of either."""
    kind = draw(st.sampled_from(["base", "payload", "payload", "raw_payload", "junk", "bytes"]))
    obj = dict(base)
    if kind in ("base", "payload"):
        if draw(st.booleans()) and obj:
            key = draw(st.sampled_from(sorted(obj)))
            obj[key] = draw(st.sampled_from([None, 3, "x", [1, 2], torch.zeros(2, dtype=torch.int8),
                                             torch.full((2,), float("nan")), torch.zeros(0)]))
        obj = draw(st.sampled_from([obj, {"state_dict": obj}, {"model": obj, "epoch": 3}, {"module": obj}]))
    mark = sentinel / f"ran-{draw(st.integers(0, 10**6))}"
    module, name, _ = draw(st.sampled_from(PAYLOADS))
    if kind == "payload":
        live = payload_object(module, name, mark)
        if live is not None:
            obj = {**obj, "scheduler": live} if draw(st.booleans()) else [obj, live]
    if kind == "raw_payload":
        args = (f"touch {mark}",) if name == "system" else (str(mark), "w")
        return payload_pickle(module, name, args)
    if kind == "junk":
        return draw(st.binary(max_size=300))
    data = torch_bytes(obj, legacy=draw(st.booleans()))
    return draw(mutated(data)) if kind == "bytes" else data


OPENAI_SD = _tiny_openai_sd()


def _reference(path: Path, base: dict) -> dict:
    """What torch's own restricted loader reads from the file (damaged bytes can still load), unwrapped to the
    state dict; the base state dict when torch refuses the file (it holds objects only bound as inert)."""
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001
        return base
    while isinstance(obj, dict) and isinstance(obj.get("state_dict", obj.get("model")), dict):
        obj = obj.get("state_dict", obj.get("model"))
    return {k.removeprefix("module."): v for k, v in obj.items()} if isinstance(obj, dict) else base


@given(st.data())
def test_fuzz_openai_checkpoint(arena, data):
    """An OpenAI-layout `.pt`: a load gives a CLIP whose weights are the file's, or one line; no payload runs."""
    from patchsae.models.openai_format import load_openai_checkpoint

    blob = data.draw(pickled(OPENAI_SD, arena[1]))

    def load(folder):
        model, _ = load_openai_checkpoint(folder / "clip.pt")
        conv = model.vision_model.embeddings.patch_embedding.weight
        assert torch.equal(conv, _reference(folder / "clip.pt", OPENAI_SD)["visual.conv1.weight"].float())
        return model

    run_case(arena, "pickles", {"clip.pt": blob}, load)


def _maple_sd():
    g = torch.Generator().manual_seed(0)
    sd = {"prompt_learner.ctx": torch.randn(2, 32, generator=g), "prompt_learner.proj.weight": torch.randn(32, 32),
          "prompt_learner.proj.bias": torch.randn(32), "prompt_learner.token_prefix": torch.randn(3, 1, 32)}
    sd.update({"prompt_learner.compound_prompts_text.0": torch.randn(2, 32),
               "prompt_learner.compound_prompt_projections.0.weight": torch.randn(32, 32),
               "prompt_learner.compound_prompt_projections.0.bias": torch.randn(32)})
    return sd


MAPLE_SD = _maple_sd()


@given(st.data())
def test_fuzz_maple_checkpoint(arena, data):
    """An official MaPLe `.pth.tar`: prompts equal to the file's tensors, or one line; no payload runs."""
    from patchsae.models.maple import load_official_checkpoint, prompts_from_state_dict

    blob = data.draw(pickled({"state_dict": MAPLE_SD, "epoch": 2}, arena[1]))

    def load(folder):
        prompts = prompts_from_state_dict(load_official_checkpoint(folder / "model.pth.tar-2"))
        assert torch.equal(prompts.ctx, _reference(folder / "model.pth.tar-2", MAPLE_SD)["prompt_learner.ctx"])
        return prompts

    run_case(arena, "pickles", {"model.pth.tar-2": blob}, load)


# ---- MaPLe prompts written by `patchsae adapt` (safetensors + config.json) ---------------------------------

@pytest.fixture(scope="module")
def maple_case(tiny_clip_dir):
    """(tiny CLIP, files of a prompts folder saved for it)."""
    from patchsae.models.load import load_model
    from patchsae.models.maple import MapleConfig, build_maple, save_prompts

    clip = load_model(str(tiny_clip_dir))
    with tempfile.TemporaryDirectory() as d:
        save_prompts(d, build_maple(clip, MapleConfig(depth=2)))
        return clip, {n: (Path(d) / n).read_bytes() for n in ("prompts.safetensors", "config.json")}


def _check_prompts(clip, folder: Path):
    from patchsae.models.maple import load_adapted

    model = load_adapted(clip, folder)
    _same_as_file(model.prompts.state_dict(), folder / "prompts.safetensors")
    return model


@given(st.data())
def test_fuzz_maple_prompts(arena, maple_case, data):
    clip, files = maple_case
    weights = data.draw(safetensors_lies(files["prompts.safetensors"]))
    run_case(arena, "safetensors", {**files, "prompts.safetensors": weights}, lambda f: _check_prompts(clip, f))


@given(st.data())
def test_fuzz_maple_config(arena, maple_case, data):
    clip, files = maple_case
    config = data.draw(mutated_json(json.loads(files["config.json"])))
    run_case(arena, "json", {**files, "config.json": config}, lambda f: _check_prompts(clip, f))


# ---- JSON: the run config and the analysis manifest ---------------------------------------------------------

@given(st.data())
def test_fuzz_run_config(arena, data):
    """DIR/config.json: a load gives a RunConfig whose every field has its declared type, or one line."""
    import typing
    from dataclasses import fields

    from patchsae.runs import Run, RunConfig

    config = data.draw(mutated_json(RunConfig().to_json()))

    def load(folder):
        cfg = Run(folder).load_config()
        hints = typing.get_type_hints(RunConfig)
        for f in fields(RunConfig):
            value, hint = getattr(cfg, f.name), hints[f.name]
            allowed = tuple(typing.get_origin(a) or a for a in typing.get_args(hint)) or (hint,)
            assert isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed), f.name
        return cfg

    run_case(arena, "json", {"config.json": config}, load)


def _analysis_files() -> dict[str, bytes]:
    """A minimal analysis folder as `analyze` writes it: stats with name indices, manifest naming them."""
    from patchsae.utils import write_safetensors

    with tempfile.TemporaryDirectory() as d:
        write_safetensors(Path(d) / "stats.safetensors", {
            "frequency_S": torch.tensor([0.5, 0.0, 0.25, 1.0]),
            "name_index_SN": torch.tensor([[0, 1], [-1, -1], [1, 0], [2, -1]])})
        stats = (Path(d) / "stats.safetensors").read_bytes()
    manifest = {"d_sae": 4, "naming": {"vocabulary": ["stripes", "dots", "edges"]}, "tau": 0.2, "k": 10}
    return {"analysis/stats.safetensors": stats, "analysis/manifest.json": json.dumps(manifest).encode()}


ANALYSIS_FILES = _analysis_files()


@given(st.data())
def test_fuzz_analysis_manifest(arena, data):
    """The analysis reader: damaged output reads as absent (None: `analyze` writes it again) or as an analysis
    whose every latent has a name; never an exception."""
    from patchsae.runs import Run
    from patchsae.runs.artefacts import read_analysis

    files = dict(ANALYSIS_FILES)
    if data.draw(st.booleans()):
        files["analysis/manifest.json"] = data.draw(mutated_json(json.loads(files["analysis/manifest.json"])))
    else:
        files["analysis/stats.safetensors"] = data.draw(safetensors_lies(files["analysis/stats.safetensors"]))

    def load(folder):
        found = read_analysis(Run(folder), 4)
        if found is not None:
            names = found.names()
            assert len(names) == 4 and all(isinstance(n, str) for n in names)
        return found

    run_case(arena, "json", files, load)
