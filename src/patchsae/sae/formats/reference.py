"""The reference implementation's checkpoint (github.com/dynamical-inference/patchsae, released as
`data/sae_weight/base/out.pt`): `torch.save({"cfg": ViTSAERunnerConfig(...), "state_dict": {W_enc [d_in, d_sae],
b_enc, W_dec [d_sae, d_in], b_dec}})`, a ReLU SAE on raw activations (f = ReLU((x - b_dec) W_enc + b_enc)).

The cfg is a pickled dataclass of a package we do not have, so `torch.load(weights_only=True)` refuses it, and a
plain unpickler would import and run whatever the file names. `SafeUnpickler` resolves only tensor
reconstruction, dtypes, devices and a few containers; every other global (the config class, or `os.system` in
a hostile file) becomes an inert `StandIn` that records its arguments and runs nothing. The config's fields
are then read from the stand-in's recorded state: model_name, block_layer, class_token, d_in,
expansion_factor, l1_coefficient.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch

from patchsae import PatchSAEError
from patchsae.sae.formats.common import ForeignSAE, PlainSAE, finish
from patchsae.sae.model import SAEConfig

_DTYPES = {f"torch.{n}": getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "double", "float", "half", "long", "int", "short")}
# legacy typed-storage classes name the element type of a tensor's bytes; we only need that dtype
_STORAGES = {f"torch.{n}Storage": getattr(torch, t) for n, t in (
    ("Double", "float64"), ("Float", "float32"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"))}
_SAFE = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.slice": slice, "builtins.complex": complex,
    "_codecs.encode": lambda text, encoding="latin1": text.encode(encoding),  # protocol-2 bytes
    **_DTYPES, **_STORAGES,
}


class StandIn:
    """Whatever a pickle names that is not on the safe list: calling, constructing or restoring it only
    records the arguments."""

    __slots__ = ("args", "state")
    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"_state": state}

    def __repr__(self):
        return f"<inert {self._qualname}>"


def _stand_in(module: str, name: str) -> type:
    """A fresh StandIn subclass named after the global, so errors and reprs say what the file asked for."""
    return type(name if name.isidentifier() else "StandIn", (StandIn,), {"_qualname": f"{module}.{name}",
                                                                         "__slots__": ()})


class SafeUnpickler(pickle.Unpickler):
    """The `data.pkl` of a torch zip checkpoint, tensors read from the archive, nothing else resolved."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.unknown: list[str] = []

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full in _SAFE:
            return _SAFE[full]
        self.unknown.append(full)
        return _stand_in(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type  # find_class turned the storage class into its dtype
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        size = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * size:
            raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, expected {numel * size}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)


def safe_load(path: Path):
    """The object a torch zip checkpoint holds, with unknown globals as StandIns; PatchSAEError if unreadable."""
    where = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise PatchSAEError(f"{where}: a zip file but not a torch checkpoint (no single data.pkl)")
            prefix = pkl[0][: -len("/data.pkl")] if "/" in pkl[0] else ""
            return SafeUnpickler(zf.read(pkl[0]), zf, prefix).load()
    except zipfile.BadZipFile:
        raise PatchSAEError(f"{where}: not a readable torch checkpoint (not a zip archive, or truncated); "
                            "only files written by torch.save since torch 1.6 are read") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, RuntimeError,
            IndexError, OSError, zipfile.LargeZipFile) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PatchSAEError(f"{where}: unreadable checkpoint ({msg})") from None


def read_reference(path: Path, source: str | None = None) -> ForeignSAE:
    where = str(path)
    obj = safe_load(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise PatchSAEError(f"{where}: not a reference PatchSAE checkpoint (expected a dict with 'cfg' and "
                            "'state_dict')")
    state = obj["state_dict"]
    if not isinstance(state, dict):
        raise PatchSAEError(f"{where}: its state_dict is not a mapping of tensors")
    cfg = _fields(obj.get("cfg"))
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    tensors = [state.get(n) for n in names]
    bad = [n for n, t in zip(names, tensors) if not torch.is_tensor(t)]
    if bad:
        raise PatchSAEError(f"{where}: state_dict lacks tensors {bad} (has {sorted(map(str, state))})")
    if any(k in state for k in ("r_mag", "b_mag")) or cfg.get("gated_sae") is True:
        raise PatchSAEError(f"{where}: gated reference SAEs are not supported")
    W_enc, b_enc, W_dec, b_dec = (t.float() for t in tensors)
    d_in = _int(cfg.get("d_in"))
    if d_in is not None and W_enc.dim() == 2 and W_enc.shape[0] != d_in:
        raise PatchSAEError(f"{where}: W_enc has shape {tuple(W_enc.shape)} but its cfg says d_in={d_in}")
    plain = PlainSAE("relu", W_enc, b_enc, W_dec, b_dec)
    l1 = cfg.get("l1_coefficient")
    ours = (SAEConfig(W_enc.shape[0], W_enc.shape[1], "relu", l1_coeff=float(l1))
            if isinstance(l1, (int, float)) and l1 > 0 and W_enc.dim() == 2 else None)
    model = cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else None
    tokens = {True: "cls", False: "all", None: "all"}.get(cfg.get("class_token"), None)
    dataset = cfg.get("dataset_path") if isinstance(cfg.get("dataset_path"), str) else None
    plain_cfg = {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return finish(plain, "reference", source or where, where, cfg=ours, model=model,
                  layer=_int(cfg.get("block_layer")), tokens=tokens, dataset=dataset,
                  info={"reference_cfg": plain_cfg})


def _fields(cfg) -> dict:
    """The recorded fields of the config stand-in (or of a plain dict), {} for anything else."""
    if isinstance(cfg, StandIn):
        return dict(cfg.state)
    return dict(cfg) if isinstance(cfg, dict) else {}


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None
