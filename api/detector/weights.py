"""Spec §5: find, read and check the backbone and head checkpoints; name what produced a score.

Every checkpoint is untrusted input: tensors are read with torch.load(weights_only=True) (or
safetensors), never plain unpickling. Every refusal is a WeightsError naming the file and the
problem, and a missing file says where it was looked for and that `d3 fetch-weights` fetches it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
import re
import socket
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from api.detector.config import DetectorConfig
from api.detector.errors import WeightsError
from api.detector.model import (
    backbone_config,
    build_head,
    build_visual,
    feature_dim,
    materialize_visual,
    open_clip_module,
    uses_quick_gelu,
)

AUTHORS_HEAD_URL = "https://github.com/BigAandSmallq/D3/raw/main/ckpt/classifier.pth"
HEAD_FILENAME = "classifier.pth"  # where `d3 fetch-weights` puts the authors' head in the cache
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
FETCH_HINT = "run `d3 fetch-weights` to download it"
_RANDOM = re.compile(r"^random:(\d+)$")
_DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class WeightsRef:
    """Where one part's weights come from, resolved from its setting without reading the file."""

    part: str  # "backbone" or "head"
    setting: str  # the environment variable, for messages
    spec: str  # the setting's value
    kind: str  # "tag", "file", "url", "random", or "hub" (a Hugging Face model repo)
    path: Path | None = None  # the file to read; None for random, or a tag not in any cache
    seed: int | None = None  # for random:<seed>
    looked_in: tuple[str, ...] = ()
    fix: str = ""  # how to provide the weights, when `d3 fetch-weights` is not the way

    @property
    def present(self) -> bool:
        return self.kind == "random" or (self.path is not None and self.path.is_file())

    def identity(self) -> str:
        """The weights' name in a model version: the tag, random:<seed>, or sha256:<12 hex>."""
        if self.kind == "random":
            return f"random:{self.seed}"
        if self.kind in ("tag", "hub"):
            return self.spec
        if self.path is None or not self.path.is_file():
            return "missing"
        return f"sha256:{file_sha256(self.path)[:12]}"

    def missing_error(self) -> WeightsError:
        where = "; ".join(self.looked_in) or str(self.path)
        what = {"tag": f"open_clip pretrained tag {self.spec!r}",
                "hub": f"Hugging Face model {self.spec!r}"}.get(self.kind, f"file {self.path}")
        fix = self.fix or f"{FETCH_HINT}, or set {self.setting} to a checkpoint file"
        return WeightsError(f"{self.part} weights not found: {what} ({self.setting}={self.spec!r}; looked in: "
                            f"{where}). To fix: {fix}.")


@dataclass(frozen=True)
class WeightsPlan:
    backbone_name: str
    shuffle_seed: int
    backbone: WeightsRef
    head: WeightsRef

    @property
    def trained(self) -> bool:
        # A random part makes the whole model meaningless as a detector.
        return self.backbone.kind != "random" and self.head.kind != "random"

    def model_version(self, precision: str) -> str:
        return version_string(self.backbone_name, self.backbone.identity(), self.head.identity(),
                              self.shuffle_seed, precision)


def version_string(backbone: str, backbone_id: str, head_id: str, shuffle_seed: int, precision: str) -> str:
    """e.g. d3/ViT-L-14-quickgelu/openai/head-sha256:abc123def456/seed0/fp16"""
    return f"d3/{backbone}/{backbone_id}/head-{head_id}/seed{shuffle_seed}/{precision}"


def head_identity(sha256: str) -> str:
    """A head file's name in a model version (and a model version's id): sha256:<12 hex>."""
    return f"sha256:{sha256[:12]}"


def with_head(model_version: str, head_id: str) -> str:
    """The model version of the same backbone, seed and precision with another head."""
    parts = model_version.split("/")
    if len(parts) == 6 and parts[0] == "d3" and parts[3].startswith("head-"):
        parts[3] = f"head-{head_id}"
        return "/".join(parts)
    return f"{model_version}+head-{head_id}"  # a model built outside the factory (tests, custom)


def backbone_is_random(model_version: str) -> bool:
    """True when the version names a random backbone: no head on it makes a meaningful detector."""
    parts = model_version.split("/")
    return len(parts) < 3 or parts[0] != "d3" or parts[2].startswith("random:")


# ---------------------------------------------------------------- resolving settings to files
def _random_seed(spec: str) -> int | None:
    match = _RANDOM.match(spec.strip())
    return int(match.group(1)) if match else None


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(("~", ".")) or spec.endswith((".pt", ".pth", ".bin", ".safetensors"))


def hf_cache_dirs(config: DetectorConfig) -> list[Path]:
    """Hugging Face hub caches searched for a pretrained tag: the d3 cache's own, then the user's."""
    return hf_cache_dirs_under(config.resolved_cache_dir)


def hf_cache_dirs_under(cache_root: Path) -> list[Path]:
    """<cache_root>/huggingface, then the user's Hugging Face hub cache (for every detector's weights)."""
    # Read at call time (not huggingface_hub's import-time constant) so HF_HUB_CACHE/HF_HOME set later count.
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    user_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub")
    dirs = [cache_root / "huggingface", Path(os.path.expanduser(user_cache))]
    return list(dict.fromkeys(dirs))


def pretrained_source(backbone: str, tag: str) -> tuple[str, tuple[str, ...], str]:
    """(HF repo id, candidate file names, OpenAI URL) of an open_clip pretrained tag."""
    backbone_config(backbone)  # registers our configs; unknown backbones fail with a clear message
    open_clip = open_clip_module()
    cfg = open_clip.get_pretrained_cfg(backbone, tag)
    if not cfg or not cfg.get("hf_hub"):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(backbone)) or "none"
        raise WeightsError(f"D3_CLIP_WEIGHTS={tag!r} is not a file and not an open_clip pretrained tag of "
                           f"{backbone!r} (its tags: {tags}); use a tag, a checkpoint file or random:<seed>")
    repo_id, filename = os.path.split(cfg["hf_hub"])
    return repo_id, ((filename,) if filename else HF_WEIGHT_FILES), cfg.get("url", "")


def find_in_hf_cache(repo_id: str, filenames: tuple[str, ...], cache_dirs: list[Path],
                     revision: str | None = None) -> Path | None:
    """The first of these files of a hub repo (at a revision: a branch, tag or commit) found in a cache."""
    from huggingface_hub import try_to_load_from_cache

    for cache_dir in cache_dirs:
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir), revision=revision)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    return None


def resolve_backbone(config: DetectorConfig) -> WeightsRef:
    spec, setting = config.clip_weights.strip(), "D3_CLIP_WEIGHTS"
    seed = _random_seed(spec)
    if seed is not None:
        return WeightsRef("backbone", setting, spec, "random", seed=seed)
    if not spec:
        raise WeightsError("D3_CLIP_WEIGHTS is empty: use 'openai', a checkpoint file or random:<seed>")
    path = Path(os.path.expanduser(spec))
    if path.exists() or _looks_like_path(spec):
        return WeightsRef("backbone", setting, spec, "file", path=path, looked_in=(str(path),))
    repo_id, filenames, url = pretrained_source(config.backbone, spec)
    dirs = hf_cache_dirs(config)
    found = find_in_hf_cache(repo_id, filenames, dirs)
    looked = [str(d / f"models--{repo_id.replace('/', '--')}") for d in dirs]
    if found is None and url:  # OpenAI's own archive, where clip.load / open_clip cache it
        clip_file = Path.home() / ".cache" / "clip" / os.path.basename(url)
        looked.append(str(clip_file))
        found = clip_file if clip_file.is_file() else None
    return WeightsRef("backbone", setting, spec, "tag", path=found, looked_in=tuple(looked))


def head_download_path(config: DetectorConfig, url: str) -> Path:
    """Cache location of a head given by URL; the authors' checkpoint gets the default name."""
    if url == AUTHORS_HEAD_URL:
        return config.resolved_cache_dir / HEAD_FILENAME
    name = os.path.basename(urllib.parse.urlparse(url).path) or "head.pth"
    return config.resolved_cache_dir / "heads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def resolve_head(config: DetectorConfig) -> WeightsRef:
    # Default: the authors' head, where `d3 fetch-weights` puts it.
    return resolve_checkpoint_setting("head", "D3_HEAD_WEIGHTS", config.head_weights,
                                      default_path=config.resolved_cache_dir / HEAD_FILENAME,
                                      url_path=lambda url: head_download_path(config, url))


def resolve_checkpoint_setting(part: str, setting: str, value: str, *, default_path: Path,
                               url_path: Callable[[str], Path]) -> WeightsRef:
    """One checkpoint-file setting: random:<seed>, empty (default_path), an https URL (cached at
    url_path(url)) or a local file. Shared by every detector whose weights are one file."""
    spec = value.strip()
    seed = _random_seed(spec)
    if seed is not None:
        return WeightsRef(part, setting, spec, "random", seed=seed)
    if not spec:
        return WeightsRef(part, setting, spec, "file", path=default_path, looked_in=(str(default_path),))
    if spec.lower().startswith(("https://", "http://")):
        path = url_path(spec)
        return WeightsRef(part, setting, spec, "url", path=path, looked_in=(str(path),))
    path = Path(os.path.expanduser(spec))
    return WeightsRef(part, setting, spec, "file", path=path, looked_in=(str(path),))


def download_if_missing(ref: WeightsRef) -> WeightsRef:
    """A URL setting's file is fetched once into the cache (refused offline); others unchanged."""
    if ref.kind == "url" and not ref.present:
        assert ref.path is not None
        download_file(ref.spec, ref.path, setting=ref.setting)
    return ref


def resolve_weights(config: DetectorConfig, *, download: bool = True) -> WeightsPlan:
    """Resolve both settings; a head URL is downloaded once into the cache when `download`."""
    head = resolve_head(config)
    if download:
        download_if_missing(head)
    return WeightsPlan(config.backbone, config.shuffle_seed, resolve_backbone(config), head)


def offline_mode() -> bool:
    """HF_HUB_OFFLINE=1 (the Hugging Face convention) also stops our own downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_pretrained(config: DetectorConfig) -> Path:
    """Download the backbone's open_clip pretrained tag into the d3 cache's Hugging Face cache."""
    from huggingface_hub import hf_hub_download

    repo_id, filenames, _ = pretrained_source(config.backbone, config.clip_weights.strip())
    cache_dir = config.resolved_cache_dir / "huggingface"
    if offline_mode():
        raise WeightsError(f"offline (HF_HUB_OFFLINE is set): cannot download {repo_id} from Hugging Face")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not _resolves(endpoint):
        # Fail in a second: huggingface_hub would retry with backoff for about a minute.
        raise WeightsError(f"cannot resolve {urllib.parse.urlsplit(endpoint).hostname}: this machine looks "
                           f"offline, so {repo_id} cannot be downloaded")
    errors = []
    for filename in filenames:  # safetensors first: no pickle at all
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=str(cache_dir)))
        except Exception as exc:  # network down, file absent in the repo, ...
            errors.append(f"{filename}: {type(exc).__name__}: {_first_line(exc)}")
    raise WeightsError(f"could not download {repo_id} from Hugging Face into {cache_dir}: " + "; ".join(errors))


def _resolves(url: str) -> bool:
    """True when the URL's host name resolves (a quick, cheap offline check)."""
    try:
        socket.getaddrinfo(urllib.parse.urlsplit(url).hostname or "", 443)
        return True
    except OSError:
        return False


def download_file(url: str, dest: Path, setting: str = "D3_HEAD_WEIGHTS") -> Path:
    """Fetch url to dest atomically (a partial download never looks like a checkpoint)."""
    if not url.lower().startswith("https://"):
        raise WeightsError(f"refusing to download weights over plain http: {url} (use https)")
    if offline_mode():
        raise WeightsError(f"offline (HF_HUB_OFFLINE is set): cannot download {url}; place the file at {dest} "
                           f"by hand or set {setting} to a local file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as src:  # noqa: S310
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    except OSError as exc:  # URLError is an OSError: no network, DNS, HTTP error
        raise WeightsError(f"could not download {url} to {dest}: {exc}. Offline? Place the file there by hand "
                           f"or set {setting} to a local file") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


# ---------------------------------------------------------------- reading checkpoint files
def is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips (OpenAI's ViT-L-14.pt) carry constants.pkl and code/; torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _pickle_globals(data: bytes) -> list[str]:
    """Names a pickle would import (without running it): code execution needs one of these."""
    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif "UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                strings.append(str(arg))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: S110 - a damaged pickle simply yields the names seen so far
        pass
    return names


def _unsafe_globals(path: Path, message: str) -> list[str]:
    found = re.findall(r"GLOBAL ([\w.]+)", message)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = b"".join(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
        else:
            data = path.read_bytes()
        found += _pickle_globals(data)
    except (OSError, zipfile.BadZipFile):
        pass
    allowed = ("torch.", "collections.OrderedDict", "_codecs.encode", "numpy.")
    return sorted({name for name in found if not name.startswith(allowed)})


def read_checkpoint(path: Path, part: str) -> Any:
    """The object stored in a checkpoint file, read safely; WeightsError naming the file otherwise."""
    if path.is_dir():
        raise WeightsError(f"{part} weights {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise WeightsError(f"{part} weights not found: {path}. To fix: {FETCH_HINT}, or point the setting "
                           "at an existing file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{part} weights {path} is corrupt: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(f"{part} weights {path} is corrupt: not a readable safetensors file ({exc})") from exc
    if is_torchscript_archive(path):
        try:
            # TorchScript is no pickle of Python objects; it is how OpenAI ships ViT-L-14.pt.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, the archives are not
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise WeightsError(f"{part} weights {path} is corrupt: unreadable TorchScript archive "
                               f"({_first_line(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        unsafe = _unsafe_globals(path, str(exc))
        if unsafe and isinstance(exc, pickle.UnpicklingError):
            raise WeightsError(f"{part} weights {path} refused: the pickle would import {', '.join(unsafe)} "
                               "(it tries to run code or build arbitrary objects); only plain tensor "
                               "checkpoints are loaded") from exc
        raise WeightsError(f"{part} weights {path} is corrupt or not a PyTorch checkpoint "
                           f"({type(exc).__name__}: {_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


# ---------------------------------------------------------------- checking and loading
def _tensor_dict(obj: Any, path: Path, part: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{part} weights {path}: expected a state_dict (a dict of tensors), "
                           f"found {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):  # {"state_dict": {...}} / {"model": {...}} training wrappers
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{part} weights {path}: entries that are not tensors: {_names(not_tensors)}")
    return {str(k): v for k, v in obj.items()}


def head_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The head's 8 tensors from any accepted layout (plain, wrapped, attention_head.-prefixed)."""
    state = _tensor_dict(obj, path, "head")
    return {k.removeprefix("attention_head."): v for k, v in state.items()}


def visual_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The image tower's tensors from an open_clip/OpenAI state_dict; text-tower keys are ignored."""
    state = _tensor_dict(obj, path, "backbone")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    state.pop("proj", None)  # the projection is not used: the feature is taken before it (spec §3)
    return state


def check_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, part: str) -> None:
    """Refuse, naming them, missing keys, unexpected keys and wrong shapes (strict loading)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_names(shapes)}")
    if problems:
        raise WeightsError(f"{part} weights {path} do not fit the model: " + "; ".join(problems))


def _names(items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _checked_visual_state(visual: nn.Module, ref: WeightsRef, backbone: str) -> dict[str, torch.Tensor]:
    if not ref.present:
        raise ref.missing_error()
    assert ref.path is not None
    tag_cfg = open_clip_module().get_pretrained_cfg(backbone, ref.spec) if ref.kind == "tag" else {}
    if (tag_cfg.get("quick_gelu") or is_torchscript_archive(ref.path)) and not uses_quick_gelu(visual):
        # OpenAI's weights were trained with QuickGELU; exact GELU silently shifts features ~5 %.
        raise WeightsError(f"backbone {backbone!r} uses exact GELU but {ref.path} holds OpenAI weights trained "
                           f"with QuickGELU: set D3_BACKBONE={backbone}-quickgelu")
    state = visual_state(read_checkpoint(ref.path, "backbone"), ref.path)
    check_state(visual, state, ref.path, "backbone")
    return state


def load_backbone(visual: nn.Module, ref: WeightsRef, backbone: str) -> None:
    """Fill the image tower from its checkpoint (a random tower is left as initialised)."""
    if ref.kind != "random":
        materialize_visual(visual, _checked_visual_state(visual, ref, backbone))


def load_checked(module: nn.Module, ref: WeightsRef, what: str,
                 state_of: Callable[[Any, Path], dict[str, torch.Tensor]]) -> None:
    """Fill `module` from its checkpoint, every key and shape checked first (random: keeps its seeded init).

    `state_of` takes the loaded checkpoint to the module's state_dict (the layouts the authors publish).
    """
    if ref.kind == "random":
        return
    if not ref.present:
        raise ref.missing_error()
    assert ref.path is not None
    state = state_of(read_checkpoint(ref.path, what), ref.path)
    check_state(module, state, ref.path, what)
    module.load_state_dict(state, strict=True)


def load_head(head: nn.Module, ref: WeightsRef) -> None:
    """Fill the head from its checkpoint (a random head keeps its seeded init)."""
    load_checked(head, ref, "head", head_state)


def head_dim(backbone: str) -> int:
    """The feature width the head of this backbone takes (built on the meta device: no memory, no init)."""
    return feature_dim(build_visual(backbone, "fp32", init_seed=None))


def head_state_from_bytes(data: bytes, dim: int, label: str) -> dict[str, torch.Tensor]:
    """A head checkpoint's tensors, read as safely as a file (weights_only) and checked against the
    spec's keys and shapes for a `dim`-wide head; WeightsError naming `label` otherwise."""
    with tempfile.TemporaryDirectory(prefix="d3-head-") as folder:
        path = Path(folder) / "head.pth"
        path.write_bytes(data)
        try:
            state = head_state(read_checkpoint(path, "head"), path)
            check_state(build_head(dim), state, path, "head")
        except WeightsError as exc:
            raise WeightsError(str(exc).replace(str(path), label)) from None
    return state


def verify_weights(config: DetectorConfig) -> dict[str, dict[str, Any]]:
    """For `d3 info` / `d3 fetch-weights`: is each part present and loadable? Nothing is downloaded.

    Checked against a meta-device image tower, so no ViT-L is materialised (or initialised) for it.
    """
    report: dict[str, dict[str, Any]] = {}
    visual = None
    for part, resolve in (("backbone", resolve_backbone), ("head", resolve_head)):
        entry: dict[str, Any] = {"present": False, "loadable": False, "identity": None, "error": None}
        report[part] = entry
        try:  # each part on its own: one broken setting must not hide the state of the other
            ref = resolve(config)
            entry.update(setting=ref.setting, value=ref.spec, kind=ref.kind,
                         path=str(ref.path) if ref.path else None, present=ref.present)
            if visual is None:
                visual = build_visual(config.backbone, "fp32", init_seed=None)
            if part == "backbone" and ref.kind != "random":
                _checked_visual_state(visual, ref, config.backbone)
            if part == "head":
                load_head(build_head(feature_dim(visual)), ref)
            entry["loadable"] = True
            entry["identity"] = ref.identity()
        except Exception as exc:  # a diagnostic reports, it does not raise
            entry["error"] = str(exc)
    return report
