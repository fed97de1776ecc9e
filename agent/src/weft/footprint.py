"""The agent's memory footprint: code it would import but never run, kept out of its process.

Most of an agent's resident memory is code: the modules it imports and the shared libraries they map
(docs/memory.md has the figures). Some imports cost much and bring nothing the agent uses:

- pyroute2's package ``__init__`` imports every netlink family it implements (IPDB, NDB, nftables, WireGuard,
  devlink, 9P, ...), about 5 MiB resident; the agent uses rtnetlink alone. :func:`pyroute2_package` lets its
  modules be imported without that ``__init__``, which still runs, whole, the first time anything asks the package
  itself for a name (``from pyroute2 import IPDB``).
- Python's ``ssl`` (which asyncio imports) and ``_hashlib`` (which hashlib and hmac import) map the system's
  OpenSSL, about 4.5 MiB. The agent speaks no TLS, and hashes a few bytes now and then (secret ids, seeds, keys of
  names), never on the data path; ``cryptography`` carries its own OpenSSL for the mesh's keys and AEAD.
  :func:`keep_openssl_out` makes both unavailable to the agent's process, as in a Python built without OpenSSL:
  asyncio then has no TLS, dnspython no DNS over TLS, and hashlib and hmac use Python's own hashes. pyroute2 imports
  ``ssl`` for a probe the agent never runs, so it gets a module that says why it cannot.
- pyroute2's rtnetlink socket module imports ``unittest.mock`` for one inert placeholder (the message queue of its
  select-style ``IPRSocket``, which the agent does not use): that import is the whole ``unittest`` package with
  argparse, difflib and pprint, about 1.5 MiB resident. :func:`pyroute2_package` has that module find, for the
  length of its own import, a ``unittest.mock`` whose ``Mock`` is such a placeholder; the real ``unittest`` stays
  importable, and a process that imported it before keeps it.
- pyroute2's config and process modules import ``multiprocessing`` (with pickle, about 0.4 MiB) for its netns
  helpers, which the agent does not use: they get, for the length of their import, one whose ``Pipe``, ``Queue`` and
  ``Process`` import the real one when called.
- pyroute2's modules import ``shutil`` (with bz2, lzma and fnmatch), ``tempfile`` and ``ctypes.util`` for tools the
  agent does not run: its tool probes and its netns helpers' libc lookup. :func:`pyroute2_package` defers them
  (:func:`defer`): the import binds them, and their code runs the first time something asks them for a name.
  About 0.6 MiB resident.
- The standard library's always-imported modules import some for rare work: linecache imports ``tokenize`` (to
  read a source file's encoding when a traceback is formatted), traceback imports ``textwrap`` (for exception
  groups). :func:`lean_stdlib` defers them: the first traceback that needs them runs them. (Not the IDNA codec
  that dnspython imports: every ``getaddrinfo`` with a host given as text runs it, and the agent's listeners make
  such calls as they start.)
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

OPENSSL_MODULES = ("ssl", "_ssl", "_hashlib")
IPRSOCKET = "pyroute2.netlink.rtnl.iprsocket"  # the one module of pyroute2 that imports unittest.mock
# What pyroute2 imports for tools the agent does not run (its TLS and tool probes, its netns helpers' libc lookup):
# shutil with bz2, lzma and fnmatch, tempfile, and ctypes.util, which imports both.
PYROUTE2_DEFERRED = ("shutil", "tempfile", "ctypes.util")
# pyroute2's traffic-control package imports a module for every queueing discipline and classifier it knows (22, which
# import its actions and ematches: 36 modules, about 0.6 MiB); the agent sets up no traffic control. Its modules under
# these names load deferred (:class:`_DeferringFinder`): bound by the package's import, run when first used.
# Imported by modules the agent always loads, used for rare work (see the module's docstring).
STDLIB_DEFERRED = ("tokenize", "textwrap")
PYROUTE2_TC = "pyroute2.netlink.rtnl.tcmsg."
PYROUTE2_TC_DEFERRED = ("sched_", "cls_")


def keep_openssl_out() -> list[str]:
    """Make ``import ssl`` and ``import _hashlib`` fail in this process (what they do in a Python built without
    OpenSSL), unless they are imported already; returns those kept out. For the agent's process, before asyncio."""
    kept = [name for name in OPENSSL_MODULES if name not in sys.modules]
    for name in kept:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not available"
    return kept


def lean_stdlib() -> list[str]:
    """Defer :data:`STDLIB_DEFERRED` (:func:`defer`); returns those deferred. For the agent's process, before
    asyncio and logging are imported."""
    return defer(STDLIB_DEFERRED)


class _NoTLS(types.ModuleType):
    """What pyroute2's TLS probe finds for ``ssl`` in a process that keeps OpenSSL out."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"ssl.{name}: this process runs without TLS (weft.footprint.keep_openssl_out)")


class _Deferred(types.ModuleType):
    """A module whose code runs the first time a name is asked of it: importing it only binds it.

    The module object is the one in ``sys.modules`` and in every importer's namespace, so once it has run it is the
    module as imported the usual way. A thread that asks while another runs it waits for it."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        with _RUNNING:
            if isinstance(self, _Deferred):  # not run meanwhile by another thread
                if self.__dict__.get("_weft_running"):
                    raise AttributeError(name)  # its own code asks for a name it has not defined yet
                spec = self.__spec__
                assert spec is not None and spec.loader is not None
                self.__dict__["_weft_running"] = True
                try:
                    spec.loader.exec_module(self)
                finally:
                    del self.__dict__["_weft_running"]
                self.__class__ = types.ModuleType
        return getattr(self, name)


_RUNNING = threading.RLock()


class _LazyPackage(_Deferred):
    """A package whose ``__init__`` runs when a name is first asked of the package itself (not of its modules)."""

    def __getattr__(self, name: str) -> Any:
        if (
            not name.startswith("__")
            and not self.__dict__.get("_weft_running")
            and importlib.util.find_spec(f"{self.__name__}.{name}") is not None
        ):
            # `from package import module` asks the package first: a module of it is imported, as it would be.
            return importlib.import_module(f"{self.__name__}.{name}")
        return super().__getattr__(name)


def defer(names: Sequence[str]) -> list[str]:
    """Register the modules ``names`` as :class:`_Deferred`, unless imported already; returns those deferred.
    A dotted name's parent package is imported (as an import of it would)."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        parent, _, child = name.rpartition(".")
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue  # not installed: an import of it says so
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _Deferred
        sys.modules[name] = module
        if parent:
            setattr(sys.modules[parent], child, module)
        deferred.append(name)
    return deferred


class _Inert:
    """Takes any call and any attribute and does nothing: what pyroute2 uses its ``mock.Mock()`` for."""

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return self

    def __getattr__(self, name: str) -> _Inert:
        if name.startswith("__"):
            raise AttributeError(name)
        return self


def _unittest_stand_in() -> dict[str, types.ModuleType]:
    """``unittest`` and ``unittest.mock`` whose ``Mock`` is an :class:`_Inert`: what pyroute2's iprsocket uses."""
    package, mock = types.ModuleType("unittest"), types.ModuleType("unittest.mock")
    mock.Mock = _Inert  # type: ignore[attr-defined]
    package.mock = mock  # type: ignore[attr-defined]
    return {"unittest": package, "unittest.mock": mock}


def _multiprocessing_stand_in() -> dict[str, types.ModuleType]:
    """A ``multiprocessing`` whose ``Pipe``, ``Queue`` and ``Process`` import the real one when called.

    pyroute2's config reads the three when imported, and its process module calls ``Process``: both only for its
    netns helpers (a child process per namespace), which the agent does not use."""
    stand_in = types.ModuleType("multiprocessing")

    def late(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module("multiprocessing"), name)(*args, **kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    for name in ("Pipe", "Queue", "Process"):
        setattr(stand_in, name, late(name))
    return {"multiprocessing": stand_in}


# pyroute2's modules that import, for what the agent never runs, a module that costs much: each runs with stand-ins.
STAND_INS: dict[str, Callable[[], dict[str, types.ModuleType]]] = {
    IPRSOCKET: _unittest_stand_in,  # the whole unittest package with argparse, difflib and pprint: 1.5 MiB
    "pyroute2.config": _multiprocessing_stand_in,  # multiprocessing with pickle: 0.4 MiB
    "pyroute2.process": _multiprocessing_stand_in,
}


class _WithStandIns:
    """Runs a module with its stand-ins in ``sys.modules`` for the length of its import, unless one of the real
    modules is imported already. (A loader and a finder by their methods: ``importlib.abc`` would import
    ``importlib.resources`` and more.)"""

    def __init__(self, loader: Any, stand_ins: Callable[[], dict[str, types.ModuleType]]) -> None:
        self._loader = loader
        self._stand_ins = stand_ins

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        stand_ins = self._stand_ins()
        if any(name in sys.modules for name in stand_ins):
            self._loader.exec_module(module)
            return
        sys.modules.update(stand_ins)
        try:
            self._loader.exec_module(module)
        finally:
            for name, stand_in in stand_ins.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]


class _StandInFinder:
    """Finds the modules of :data:`STAND_INS` as the path finder does, with :class:`_WithStandIns` as loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        stand_ins = STAND_INS.get(fullname)
        if stand_ins is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithStandIns(spec.loader, stand_ins)
        return spec


class _DeferringLoader:
    """Creates a module as its loader would, as a :class:`_Deferred`: its code runs when a name is first asked of
    it (then through this loader's ``exec_module``, which runs it for real)."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__dict__.get("_weft_running"):  # asked for a name: _Deferred runs it now
            self._loader.exec_module(module)
        else:
            module.__class__ = _Deferred


class _DeferringFinder:
    """Finds pyroute2's traffic-control modules (:data:`PYROUTE2_TC_DEFERRED`) as the path finder does, with
    :class:`_DeferringLoader` as loader. (:func:`defer` cannot: finding a module of a package runs the package's
    ``__init__``, which here imports them all.)"""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(PYROUTE2_TC) or not fullname[len(PYROUTE2_TC) :].startswith(PYROUTE2_TC_DEFERRED):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferringLoader(spec.loader)
        return spec


def pyroute2_package() -> None:
    """Register the ``pyroute2`` package without running its ``__init__`` (unless it is imported already), so that
    importing one of its modules loads only what that module needs."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed as a package: the import that follows says so
    package = importlib.util.module_from_spec(spec)
    package.__class__ = _LazyPackage
    sys.modules["pyroute2"] = package
    defer(PYROUTE2_DEFERRED)
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())  # see STAND_INS
    if not any(isinstance(f, _DeferringFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferringFinder())  # see PYROUTE2_TC_DEFERRED
    if "ssl" in sys.modules and sys.modules["ssl"] is None:  # kept out: see keep_openssl_out
        sys.modules["ssl"] = _NoTLS("ssl")
        try:
            importlib.import_module("pyroute2.netlink.rtnl.probe_msg")  # the one module of it that imports ssl
        finally:
            sys.modules["ssl"] = None  # type: ignore[assignment]


def dnspython_plain() -> None:
    """Tell dnspython that none of its optional features is available, without ``importlib.metadata``, unless
    dnspython's feature checks were loaded already. Degrades to nothing if dnspython changes how it checks."""
    if "dns._features" in sys.modules or importlib.util.find_spec("dns") is None:
        return
    stub = "importlib.metadata" not in sys.modules
    if stub:  # dns._features imports it at the top, and uses it only in the checks forced below
        sys.modules["importlib.metadata"] = types.ModuleType("importlib.metadata")
    try:
        features = importlib.import_module("dns._features")
    finally:
        if stub:
            del sys.modules["importlib.metadata"]
            if isinstance(getattr(importlib, "metadata", None), types.ModuleType) and not hasattr(
                importlib.metadata, "version"
            ):
                del importlib.metadata
    for name in getattr(features, "_requirements", {}):
        features.force(name, False)
