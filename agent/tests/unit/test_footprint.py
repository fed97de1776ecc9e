"""What the agent's process imports: the libraries it dropped stay out, pyroute2's modules load without its package
init (which still runs when something asks the package for a name), and metrics keep the Prometheus text format.

Imports are process-wide, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from weft.metrics import Metrics
from weft.promtext import Counter, Gauge, Registry

SRC = str(Path(__file__).resolve().parents[2] / "src")


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_the_agent_imports_no_web_framework_no_model_library_and_no_metrics_library() -> None:
    """aiohttp, pydantic and prometheus-client were most of an agent's memory; the API client (http.client) is the
    CLI's."""
    out = python(
        "import sys\n"
        "import weft.agent, weft.api.server, weft.datapath.plane, weft.datapath.netdev, weft.dns.host\n"
        "import weft.dns.server, weft.dns.upstream\n"
        "gone = ('aiohttp', 'pydantic', 'prometheus_client', 'yarl', 'multidict', 'http.client')\n"
        "print(' '.join(sorted(m for m in sys.modules if m in gone or m.split('.')[0] in gone)))\n"
    )
    assert out.split() == []


def test_a_handshake_key_needs_no_key_serialization_nor_bcrypt() -> None:
    """cryptography's serialization package brings its SSH key support, bcrypt and every key type (0.8 MiB resident
    in the agent); a handshake needs the raw X25519 bytes alone."""
    out = python(
        "import sys\n"
        "from weft.mesh.crypto import EphemeralKey\n"
        "a, b = EphemeralKey(), EphemeralKey()\n"
        "assert len(a.public) == 32 and a.exchange(b.public) == b.exchange(a.public)\n"
        "gone = ('bcrypt', 'cryptography.hazmat.primitives.serialization', 'cryptography.hazmat.backends')\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(gone))))\n"
        "from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey\n"
        "c = X25519PrivateKey.generate()\n"  # a key of the public API agrees with ours, both ways
        "c_pub = c.public_key().public_bytes_raw()\n"
        "print(a.exchange(c_pub) == c.exchange(X25519PublicKey.from_public_bytes(a.public)))\n"
    )
    gone, agrees = out.splitlines()
    assert gone.split() == []  # the OpenSSL backend module is 1.1 MiB of cffi bindings built name by name
    assert agrees == "True"


def test_x25519_falls_back_to_the_public_api_in_fips_mode_or_on_another_layout() -> None:
    """Where OpenSSL runs in FIPS mode the public class methods refuse X25519 with cryptography's own error, and a
    release of cryptography without these functions gets the class methods too: a handshake never runs on a guess."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    from weft.mesh.crypto import x25519_functions

    class Fips:
        x25519 = object()

        @staticmethod
        def is_fips_enabled() -> bool:
            return True

    public = (X25519PrivateKey.generate, X25519PublicKey.from_public_bytes)
    assert x25519_functions(Fips) == public
    assert x25519_functions(object()) == public  # no such functions at all
    assert x25519_functions(None) == public  # no such module at all
    from cryptography.hazmat.bindings._rust import openssl

    new_key, read_public = x25519_functions(openssl)
    assert (new_key, read_public) != public
    key = new_key()
    assert read_public(key.public_key().public_bytes_raw()).public_bytes_raw() == key.public_key().public_bytes_raw()


def test_pyroute2_modules_load_without_the_package_init_which_still_runs_on_demand() -> None:
    out = python(
        "import sys\n"
        "import weft.datapath.netdev\n"
        "print('ndb' if 'pyroute2.ndb.main' in sys.modules else 'lean')\n"
        "from pyroute2 import IPRoute, NDB\n"  # the package's own names: its __init__ runs now, once
        "from pyroute2.iproute.linux import IPRoute as Linux\n"
        "import pyroute2\n"
        "print(IPRoute is Linux, 'pyroute2.ndb.main' in sys.modules, type(pyroute2).__name__, pyroute2.__version__)\n"
    )
    first, second = out.splitlines()
    assert first == "lean"
    same, ndb, kind, _ = second.split()
    assert (same, ndb, kind) == ("True", "True", "module")


def test_pyroute2_loads_without_unittest_which_stays_importable() -> None:
    """pyroute2's rtnetlink imports unittest.mock for a placeholder the agent never uses (1.5 MiB resident)."""
    out = python(
        "import sys\n"
        "import weft.datapath.netdev\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('unittest', 'argparse', 'difflib')))\n"
        "from pyroute2.netlink.rtnl.iprsocket import NotLocal\n"
        "NotLocal.msg_queue.put_nowait(0, b'')\n"  # what pyroute2's select-style socket does with it
        "from unittest import mock\n"
        "print(type(mock.Mock()).__name__, mock.Mock().anything.called)\n"
    )
    assert out.splitlines() == ["[]", "Mock False"]


def test_a_process_that_imported_unittest_first_gives_pyroute2_the_real_mock() -> None:
    out = python(
        "import unittest.mock\n"
        "import weft.datapath.netdev\n"
        "from pyroute2.netlink.rtnl.iprsocket import NotLocal\n"
        "print(type(NotLocal.msg_queue).__name__)\n"
    )
    assert out.split() == ["Mock"]


def test_pyroute2_loads_without_multiprocessing_which_its_helpers_still_get_when_called() -> None:
    """pyroute2's config and process modules import multiprocessing (with pickle, 0.4 MiB) for netns helpers the
    agent never runs; called, they get the real thing, and so does anyone who imports it."""
    out = python(
        "import sys\n"
        "import weft.datapath.netdev\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('multiprocessing', 'pickle')))\n"
        "from pyroute2 import config\n"
        "reader, writer = config.MpPipe()\n"
        "writer.send('through a real pipe'); print(reader.recv())\n"
        "import multiprocessing\n"
        "print(isinstance(multiprocessing.Process, type), config.MpProcess.__name__)\n"
    )
    assert out.splitlines() == ["[]", "through a real pipe", "True Process"]


def test_a_process_that_imported_multiprocessing_first_gives_pyroute2_the_real_one() -> None:
    out = python(
        "import multiprocessing\n"
        "import weft.datapath.netdev\n"
        "from pyroute2 import config, process\n"
        "print(config.MpProcess is multiprocessing.Process, process.multiprocessing is multiprocessing)\n"
    )
    assert out.split() == ["True", "True"]


def test_a_process_that_imported_pyroute2_first_keeps_it_whole() -> None:
    out = python(
        "import sys, pyroute2\n"
        "import weft.datapath.netdev\n"
        "print('pyroute2.ndb.main' in sys.modules, type(sys.modules['pyroute2']).__name__)\n"
    )
    assert out.split() == ["True", "module"]


def test_the_data_planes_imports_leave_shutil_tempfile_and_ctypes_util_unrun_until_used() -> None:
    """pyroute2 imports them for tools the agent never runs (about 0.6 MiB with bz2 and lzma); whoever uses them
    later gets the module, run then, as an import would have given it."""
    out = python(
        "import sys\n"
        "import weft.datapath.netdev, weft.datapath.fastguard, weft.datapath.portguard, weft.datapath.plane\n"
        "import weft.agent\n"
        "names = ('shutil', 'tempfile', 'ctypes.util', 'bz2', 'lzma')\n"
        "print(' '.join(f'{n}={type(sys.modules[n]).__name__}' for n in names if n in sys.modules))\n"
        "from weft.datapath.fastguard import find_nft\n"
        "print(find_nft())\n"
        "import shutil, ctypes.util\n"
        "from tempfile import *\n"  # __all__ runs it too
        "print(shutil.which('sh'), ctypes.util.find_library('c'), callable(mkdtemp), 'lzma' in sys.modules)\n"
        "print(type(shutil).__name__, type(sys.modules['tempfile']).__name__, shutil.rmtree.__module__)\n"
    )
    before, nft, used, after = out.splitlines()
    assert before == "shutil=_Deferred tempfile=_Deferred ctypes.util=_Deferred"  # neither bz2 nor lzma
    assert nft.endswith("/nft")
    assert used.split()[1:] == ["libc.so.6", "True", "True"] and used.split()[0].endswith("/sh")
    assert after == "module module shutil"


def test_the_stdlib_modules_for_tracebacks_run_only_when_first_used() -> None:
    """tokenize and textwrap (formatting a traceback) stay unrun in the agent's process until something needs them,
    and then work as imported the usual way."""
    out = python(
        "import sys\n"
        "from weft.footprint import keep_openssl_out, lean_stdlib\n"
        "keep_openssl_out(); lean_stdlib()\n"
        "import asyncio, logging, traceback, weft.agent, weft.dns.server\n"
        "names = ('tokenize', 'textwrap')\n"
        "print(' '.join(f'{n}={type(sys.modules[n]).__name__}' for n in names if n in sys.modules))\n"
        "import json\n"
        "try:\n"
        "    json.loads('{')\n"
        "except ValueError:\n"
        "    print('_default_decoder.decode(s)' in traceback.format_exc())\n"  # a source line: linecache, tokenize
        "import textwrap\n"
        "print(textwrap.dedent('  x'))\n"
        "print(' '.join(type(sys.modules[n]).__name__ for n in names))\n"
    )
    before, traced, used, after = out.splitlines()
    assert before == "tokenize=_Deferred textwrap=_Deferred"
    assert traced == "True"
    assert used == "x"
    assert after == "module module"


def test_pyroute2s_traffic_control_modules_load_unrun_until_a_message_needs_them() -> None:
    """The agent sets up no traffic control; pyroute2 imports a module per queueing discipline and classifier (and
    their actions: about 0.6 MiB). They are bound, not run, and a tc message that needs one still gets it whole."""
    out = python(
        "import sys\n"
        "import weft.footprint as f\n"
        "f.pyroute2_package()\n"
        "import weft.datapath.netdev\n"
        "tc = [n for n in sys.modules if n.startswith('pyroute2.netlink.rtnl.tcmsg.')]\n"
        "print(len(tc), sorted({type(sys.modules[n]).__name__ for n in tc}))\n"
        "print(any('.act_' in n or '.em_' in n for n in sys.modules))\n"
        "from pyroute2.netlink.rtnl.tcmsg import plugins\n"
        "htb = plugins['htb']\n"
        "print(type(htb).__name__, callable(htb.options.encode), type(htb).__name__)\n"
    )
    loaded, actions, used = out.splitlines()
    assert loaded.startswith("22 ") and loaded.endswith("['_Deferred']"), loaded
    assert actions == "False"
    assert used == "_Deferred True module"


def test_a_deferred_module_runs_once_when_threads_race_to_it() -> None:
    out = python(
        "import sys, threading\n"
        "from weft.footprint import defer\n"
        "print(defer(['textwrap', 'sys', 'no_such_module_here']))\n"
        "import textwrap\n"
        "seen = []\n"  # a class its code defines: a second run would make another
        "ts = [threading.Thread(target=lambda: seen.append(textwrap.TextWrapper)) for _ in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(len(set(seen)), seen[0] is textwrap.TextWrapper, type(textwrap).__name__)\n"
        "try:\n"
        "    textwrap.no_such_name\n"
        "except AttributeError as exc:\n"
        "    print('AttributeError', exc)\n"
    )
    deferred, raced, missing = out.splitlines()
    assert deferred == "['textwrap']"  # imported already or not installed: left as they are
    assert raced == "1 True module"
    assert missing.startswith("AttributeError") and "no_such_name" in missing


def test_the_metrics_text_is_prometheus_text_with_labels_escaped() -> None:
    registry = Registry()
    hits = Counter("demo_hits", 'Hits, with a "quote" and a back\\slash\nand a newline', ["peer"], registry=registry)
    level = Gauge("demo_level", "A level", registry=registry)
    hits.labels('odd"name\\with\nnewline').inc(3)
    hits.labels("plain").inc()
    level.set(2.5)
    registry.register(lambda: [])  # a collector with nothing to say
    families = {f.name: f for f in text_string_to_metric_families(registry.render().decode())}
    assert families["demo_hits"].type == "counter"
    assert families["demo_hits"].documentation == 'Hits, with a "quote" and a back\\slash\nand a newline'
    samples = {s.labels["peer"]: (s.name, s.value) for s in families["demo_hits"].samples}
    assert samples == {'odd"name\\with\nnewline': ("demo_hits_total", 3.0), "plain": ("demo_hits_total", 1.0)}
    assert [(s.name, s.value) for s in families["demo_level"].samples] == [("demo_level", 2.5)]
    assert registry.get_sample_value("demo_hits_total", {"peer": "plain"}) == 1.0
    assert registry.get_sample_value("demo_level") == 2.5


def test_every_agent_metric_parses_and_the_data_paths_counters_are_counters() -> None:
    metrics = Metrics()
    peers = {"02:00:00:00:00:01": (1376, {"fast": 0, "sleeve": 1})}
    metrics.add_datapath(lambda: {("sleeve", "tx"): 10}, lambda: {"replay": 2}, list, lambda: peers)
    metrics.gossip_bytes[("topology", "out")] += 100
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["weft_datapath_bytes"].samples[0].value == 10
    assert families["weft_datapath_packets_dropped"].type == "counter"
    assert families["weft_gossip_bytes"].samples[0].name == "weft_gossip_bytes_total"
    assert [(s.labels, s.value) for s in families["weft_connection_mtu"].samples] == [
        ({"peer": "02:00:00:00:00:01"}, 1376)
    ]
    assert {s.labels["path"]: s.value for s in families["weft_connection_path"].samples} == {"fast": 0, "sleeve": 1}
    peers.clear()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["weft_connection_mtu"].samples == []
    assert families["weft_peers"].samples[0].value == 0


def test_the_agents_process_runs_without_the_systems_openssl() -> None:
    """asyncio, pyroute2, dnspython and the mesh's crypto all import and work; no libssl or libcrypto is mapped."""
    out = python(
        "import sys\n"
        "from weft.footprint import keep_openssl_out\n"
        "print(sorted(keep_openssl_out()))\n"
        "import asyncio, hashlib, hmac, secrets\n"
        "import weft.agent, weft.datapath.netdev, weft.dns.server, weft.dns.upstream, weft.mesh.crypto\n"
        "import dns.message, dns.query\n"
        "from pyroute2.netlink.rtnl import probe_msg\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('libssl' in maps, 'libcrypto.so' in maps)\n"
        "mac = hmac.new(b'k', b'm', hashlib.sha256).hexdigest()[:8]\n"
        "print(mac, hashlib.blake2b(b'x', digest_size=4).hexdigest())\n"
        "try:\n"
        "    import ssl\n"
        "except ImportError:\n"
        "    print('no ssl')\n"
        "try:\n"
        "    probe_msg.ssl.create_default_context()\n"
        "except ImportError as exc:\n"
        "    print('probe:', exc)\n"
        "asyncio.run(asyncio.sleep(0))\n"
    )
    lines = out.splitlines()
    assert lines[0] == "['_hashlib', '_ssl', 'ssl']"
    assert lines[1] == "False False"
    assert lines[2] == "b60090e3 " + __import__("hashlib").blake2b(b"x", digest_size=4).hexdigest()
    assert lines[3] == "no ssl"
    assert lines[4].startswith("probe: ssl.create_default_context: this process runs without TLS")


def test_dnspython_answers_without_reading_package_metadata() -> None:
    """Its optional features are off before it looks (importlib.metadata imports the email package, zipfile...)."""
    out = python(
        "import sys\n"
        "import weft.dns.server, weft.dns.upstream\n"
        "import dns.message, dns.name, dns._features\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('email', 'zipfile', 'idna')"
        " or m == 'importlib.metadata'))\n"
        "print(sorted(k for k, v in dns._features._cache.items() if v))\n"
        "q = dns.message.make_query('web.weft.local.', 'A')\n"
        "print(dns.message.from_wire(q.to_wire()).question[0].name)\n"
        "import importlib.metadata\n"
        "print(bool(importlib.metadata.version('dnspython')))\n"
    )
    assert out.splitlines() == ["[]", "[]", "web.weft.local.", "True"]
