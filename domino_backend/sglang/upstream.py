"""Run SGLang's own pure-Python pieces without SGLang's runtime (for CPU checks and GPU benches).

SGLang 0.5.23 cannot run on our CPU machines, and `import sglang` pulls an 11 GB CUDA stack, but a
few of its files need only torch: `speculative/domino_utils.py` (the Domino rollout),
`plugins/hook_registry.py` and `plugins/__init__.py` (plugin discovery), and the config parser in
`speculative/dflash_utils.py` (whose module-level SGLang imports it never uses). This module finds
the pinned release's files and executes them as private modules; nothing here imports `sglang`.

Where the files come from, first match wins:
1. `$DOMINO_SGLANG_WHEEL`: a `sglang-0.5.23-*.whl` file or a folder holding an unpacked `sglang/`;
2. an installed `sglang` distribution of the pinned version (read from site-packages, not imported);
3. `${DOMINO_CACHE:-~/.cache/domino}/wheels/sglang-0.5.23-*.whl`, which `bash setup.sh dev` puts
   there with `pip download --no-deps sglang==0.5.23` (39 MB, no dependencies installed).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import os
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

SGLANG_VERSION = "0.5.23"
DOMINO_UTILS = "sglang/srt/speculative/domino_utils.py"
DFLASH_UTILS = "sglang/srt/speculative/dflash_utils.py"
HOOK_REGISTRY = "sglang/srt/plugins/hook_registry.py"
PLUGINS_INIT = "sglang/srt/plugins/__init__.py"
WHEEL_GLOB = f"sglang-{SGLANG_VERSION}-*.whl"
DOWNLOAD_HINT = (
    f'python -m pip download --no-deps "sglang=={SGLANG_VERSION}" '
    '-d "${DOMINO_CACHE:-$HOME/.cache/domino}/wheels"'
)


class SGLangSourceUnavailable(RuntimeError):
    """The pinned SGLang release's files are not on this machine."""


@dataclass(frozen=True)
class UpstreamSource:
    """Read access to the files of one SGLang release: a wheel (zip) or a directory tree."""

    location: Path
    kind: str  # "wheel" | "dir"

    def read(self, relpath: str) -> str:
        if self.kind == "wheel":
            with zipfile.ZipFile(self.location) as zf:
                try:
                    return zf.read(relpath).decode("utf-8")
                except KeyError as e:
                    raise SGLangSourceUnavailable(f"{relpath} is not in {self.location}") from e
        path = self.location / relpath
        if not path.is_file():
            raise SGLangSourceUnavailable(f"{relpath} is not under {self.location}")
        return path.read_text(encoding="utf-8")

    def origin(self, relpath: str) -> str:
        return f"{self.location}!/{relpath}" if self.kind == "wheel" else str(self.location / relpath)

    def __str__(self) -> str:
        return f"sglang {SGLANG_VERSION} ({self.kind}: {self.location})"


def cache_dir() -> Path:
    return Path(os.environ.get("DOMINO_CACHE", Path.home() / ".cache" / "domino")).expanduser()


def _installed_dist_dir() -> Path | None:
    try:
        dist = importlib.metadata.distribution("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != SGLANG_VERSION:
        return None
    root = Path(dist.locate_file(""))
    return root if (root / DOMINO_UTILS).is_file() else None


def find_source() -> UpstreamSource:
    """Locate the pinned SGLang release (see the module docstring) or raise SGLangSourceUnavailable."""
    tried = []
    env = os.environ.get("DOMINO_SGLANG_WHEEL")
    if env:
        p = Path(env).expanduser()
        if p.is_file() and p.suffix == ".whl":
            return UpstreamSource(p, "wheel")
        if (p / DOMINO_UTILS).is_file():
            return UpstreamSource(p, "dir")
        tried.append(f"$DOMINO_SGLANG_WHEEL={env} (not a wheel, nor a folder with {DOMINO_UTILS})")
    installed = _installed_dist_dir()
    if installed is not None:
        return UpstreamSource(installed, "dir")
    tried.append(f"installed sglang=={SGLANG_VERSION} (absent)")
    wheels = sorted((cache_dir() / "wheels").glob(WHEEL_GLOB))
    if wheels:
        return UpstreamSource(wheels[-1], "wheel")
    tried.append(f"{cache_dir() / 'wheels' / WHEEL_GLOB} (absent)")
    raise SGLangSourceUnavailable(
        f"SGLang {SGLANG_VERSION} files not found; tried " + "; ".join(tried) + f". Get the wheel with: {DOWNLOAD_HINT}"
    )


def _strip_sglang_imports(source: str, origin: str) -> tuple[types.CodeType, list[str]]:
    """Compile `source` without its top-level `from sglang... import` statements.

    Returns the code and the names those imports would have bound (bound to placeholders that
    raise when used, so a code path that needs the SGLang runtime fails loudly, never silently)."""
    tree = ast.parse(source, filename=origin)
    names: list[str] = []
    body = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sglang":
            names += [a.asname or a.name for a in node.names]
            continue
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "sglang" for a in node.names):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
            continue
        body.append(node)
    tree.body = body
    return compile(tree, origin, "exec"), names


class _RuntimeOnly:
    """Placeholder for an SGLang runtime object that a stripped module referenced."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *a, **k):
        raise SGLangSourceUnavailable(f"{self._name} needs the SGLang runtime (not loaded on purpose)")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise SGLangSourceUnavailable(f"{self._name}.{attr} needs the SGLang runtime (not loaded on purpose)")

    def __bool__(self) -> bool:
        return False


def load_module(relpath: str, name: str | None = None, *, strip_sglang_imports: bool = False,
                overrides: dict | None = None, source: UpstreamSource | None = None,
                register: bool = True) -> types.ModuleType:
    """Execute one upstream file as a private module (`_domino_upstream.<file stem>` by default).

    With strip_sglang_imports, names imported from `sglang` become placeholders that raise when
    used, except those given in `overrides` (values the module needs while it is executed)."""
    src = source or find_source()
    text = src.read(relpath)
    origin = src.origin(relpath)
    name = name or "_domino_upstream." + Path(relpath).stem
    mod = types.ModuleType(name)
    mod.__file__ = origin
    if strip_sglang_imports:
        code, stubbed = _strip_sglang_imports(text, origin)
        for n in stubbed:
            setattr(mod, n, (overrides or {}).get(n, _RuntimeOnly(n)))
    else:
        code = compile(text, origin, "exec")
    if register:  # dataclasses and pickling look modules up by name
        sys.modules[name] = mod
    try:
        exec(code, mod.__dict__)
    except BaseException:
        if register:
            sys.modules.pop(name, None)
        raise
    return mod


_cache: dict[str, types.ModuleType] = {}


def domino_utils() -> types.ModuleType:
    """SGLang's `domino_utils` (`domino_greedy_rollout`, `validate_domino_runtime`); needs only torch."""
    if "domino_utils" not in _cache:
        _cache["domino_utils"] = load_module(DOMINO_UTILS)
    return _cache["domino_utils"]


def dflash_config_parser():
    """SGLang's `parse_dflash_draft_config` (the code SGLang runs on a draft `config.json`)."""
    if "dflash_utils" not in _cache:
        # Executed at import: `... and not is_npu()`. We are not on an NPU and have no sampling kernel.
        _cache["dflash_utils"] = load_module(
            DFLASH_UTILS, strip_sglang_imports=True,
            overrides={"is_npu": lambda: False, "tree_speculative_sampling_target_only": None},
        )
    return _cache["dflash_utils"].parse_dflash_draft_config


class _EnvVar:
    def __init__(self, key: str):
        self.key = key

    def get(self):
        return os.environ.get(self.key) or None


class _Envs:
    def __getattr__(self, key: str) -> _EnvVar:
        return _EnvVar(key)


@contextlib.contextmanager
def lightweight_sglang(source: UpstreamSource | None = None):
    """Temporarily install a minimal `sglang` package in sys.modules made of the release's real
    `plugins/__init__.py`, `plugins/hook_registry.py` and `speculative/domino_utils.py`, with
    `sglang.srt.environ.envs` reading plain environment variables. Yields the `sglang.srt.plugins`
    module: its `load_plugins()` discovers entry points and applies hooks exactly as in a server
    process. Everything is removed again on exit."""
    src = source or find_source()
    names = ["sglang", "sglang.srt", "sglang.srt.plugins", "sglang.srt.plugins.hook_registry",
             "sglang.srt.environ", "sglang.srt.speculative", "sglang.srt.speculative.domino_utils"]
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    try:
        for pkg in ("sglang", "sglang.srt", "sglang.srt.speculative"):
            m = types.ModuleType(pkg)
            m.__path__ = []  # a namespace-like package: submodules come only from sys.modules
            sys.modules[pkg] = m
        environ = types.ModuleType("sglang.srt.environ")
        environ.envs = _Envs()
        sys.modules["sglang.srt.environ"] = environ
        hooks = load_module(HOOK_REGISTRY, "sglang.srt.plugins.hook_registry", source=src)
        du = load_module(DOMINO_UTILS, "sglang.srt.speculative.domino_utils", source=src)
        plugins = types.ModuleType("sglang.srt.plugins")
        plugins.__path__ = []
        plugins.__file__ = src.origin(PLUGINS_INIT)
        sys.modules["sglang.srt.plugins"] = plugins
        exec(compile(src.read(PLUGINS_INIT), plugins.__file__, "exec"), plugins.__dict__)
        sys.modules["sglang"].srt = sys.modules["sglang.srt"]
        sys.modules["sglang.srt"].plugins = plugins
        sys.modules["sglang.srt"].speculative = sys.modules["sglang.srt.speculative"]
        sys.modules["sglang.srt"].environ = environ
        plugins.hook_registry = hooks
        sys.modules["sglang.srt.speculative"].domino_utils = du
        yield plugins
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
