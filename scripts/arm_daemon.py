"""The whole daemon on aarch64: `pocketembed serve` under qemu-aarch64, with everything it loads built for ARM.

    python scripts/arm_daemon.py stage               # the aarch64 site dir; cached, a second run does nothing
    python scripts/arm_daemon.py check               # under emulation: machine, llama.cpp's CPU features, the C scan
    python scripts/arm_daemon.py serve [SERVE ARGS]  # pocketembed serve under qemu-aarch64-static
    python scripts/arm_daemon.py cli ARGS...         # any pocketembed command under emulation (clients add ...)

The phone runs pocketembed's Python daemon with a native CPython, pyzmq, msgpack,
numpy, msgspec, psutil, SQLite, the store's C Hamming scan and llama.cpp, all
aarch64. On an x86 machine this runs the same daemon in the arm64 Debian root that
`scripts/arm_verify.sh --build-only` makes ($POCKETEMBED_ARM_DIR, default
~/.cache/pocketembed/arm: root/ and the cross-built llama.cpp in lib-dotprod/),
under qemu-aarch64 user-mode emulation:

- daemon-site/: the aarch64 (manylinux) wheels of the daemon's dependencies, read
  from pyproject.toml (the base dependencies, the daemon and http extras) and from
  the pinned llama-cpp-python sdist (its own imports), plus that sdist's llama_cpp
  Python bindings (the libraries come from lib-<build>/ via LLAMA_CPP_LIB_PATH).
  Staged once; restaged only when a requirement changes.
- daemon-build/: the store's C extension (daemon/_hamming.c) cross-compiled with
  aarch64-linux-gnu-gcc against Debian's arm64 Python 3.11 headers (the
  libpython3.11-dev arm64 package, fetched from the Debian mirror), with
  setup.py's aarch64 flags. Rebuilt only when the source changes.
- daemon-pkg/: pocketembed laid out as installed (its package-dir mapping) with that
  extension inside; synced from the checkout at each stage (files copied only when
  they differ), so a daemon started here runs the checkout's code.

The daemon then starts as `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3 -m
pocketembed.cli serve ...` with PYTHONPATH=daemon-pkg:daemon-site and
LLAMA_CPP_LIB_PATH=lib-dotprod, emulating a Cortex-A76 (NEON and dotprod). It
serves on real Unix and TCP sockets of this machine, so host clients (the Java
client, `pocketembed status`) talk to it as they would to a native one.
Exit status 3 when a prerequisite is missing (it says which).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("POCKETEMBED_ARM_DIR", Path.home() / ".cache/pocketembed/arm"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
PYTHON_VERSION = "3.11"
"""Debian bookworm's python3, the arm64 root's interpreter."""
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{v}_aarch64" for v in range(17, 37)]
"""Every manylinux tag bookworm's glibc 2.36 runs: pip matches --platform literally, not "this or older"."""
EXT_SUFFIX = ".cpython-311-aarch64-linux-gnu.so"
HAMMING_FLAGS = ["-O3", "-pthread", "-fPIC", "-shared"]
"""setup.py's aarch64 flags (no -mpopcnt: NEON's CNT is base ARMv8), plus what a shared object needs."""
PACKAGES = {"pocketembed": "pocketembed", "pocketembed/daemon": "daemon", "pocketembed/ipc": "ipc",
            "pocketembed/gguf_models": "gguf_models"}
"""pyproject.toml's package-dir mapping: where each package's files are in the checkout."""
BUILDS = {"dotprod": "cortex-a76", "i8mm": "max"}
"""Each cross build and the CPU qemu emulates for it (QEMU_CPU overrides): the dotprod build on a real
phone core that has dotprod and nothing later (Cortex-A76: no i8mm, no SVE, no pointer authentication;
64 SMS embedded in 37 s against "max"'s 46 s, back to back on a busy machine), the i8mm build on qemu's
"max" (qemu 7.2 models no core with i8mm)."""


class Missing(Exception):
    """A prerequisite this machine lacks; the message says what and how to get it."""


def say(msg: str) -> None:
    print(f"arm_daemon: {msg}", file=sys.stderr)


def llama_version() -> str:
    """The llama-cpp-python version scripts/llama.lock pins (the sdist arm_verify.sh unpacked)."""
    for line in (REPO / "scripts" / "llama.lock").read_text().splitlines():
        if line.startswith("LLAMA_CPP_PYTHON_VERSION="):
            return line.split("=", 1)[1].strip()
    raise Missing("scripts/llama.lock names no LLAMA_CPP_PYTHON_VERSION")


def llama_src(work: Path) -> Path:
    return work / f"llama_cpp_python-{llama_version()}"


def missing(work: Path = WORK, build: str = "dotprod", staged: bool = True) -> str | None:
    """Why the daemon cannot run under emulation here (None: it can). ``staged``: also need stage() done."""
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64-static is not installed (Debian: qemu-user-static)"
    for need in (f"lib-{build}/libllama.so", "root/.unpacked", f"{llama_src(work).name}/llama_cpp/__init__.py"):
        if not (work / need).exists():
            return (f"no ARM build in {work} ({need}): run scripts/arm_verify.sh --build-only "
                    "(needs g++-aarch64-linux-gnu, qemu-user-static, debootstrap)")
    if staged:
        if not (work / "daemon-site" / ".staged.json").exists() or not (work / "daemon-pkg" / ".synced").exists():
            return f"no aarch64 site dir in {work}: run scripts/arm_daemon.py stage (after arm_verify.sh --build-only)"
        if stale := stale_requirements(work):
            return f"the aarch64 site dir in {work} is stale ({stale}): run scripts/arm_daemon.py stage"
    return None


# -- the wheels ---------------------------------------------------------------------------------


def requirements(work: Path) -> list[str]:
    """What the daemon imports beside pocketembed: pyproject's base, daemon and http requirements, llama_cpp's own."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = [*project["dependencies"], *extras["daemon"], *extras["http"]]
    bindings = tomllib.loads((llama_src(work) / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs += bindings
    # llama-cpp-python itself is staged from its sdist below (the Python half) and lib-<build> (the C half).
    own = [r for r in reqs if not r.lower().replace("_", "-").startswith("llama-cpp-python")]
    return sorted(dict.fromkeys(own))


def stale_requirements(work: Path) -> str | None:
    """What changed since the site dir was staged (None: nothing)."""
    try:
        stamp = json.loads((work / "daemon-site" / ".staged.json").read_text())
    except (OSError, ValueError):
        return "no stamp"
    if stamp.get("requirements") != requirements(work):
        return "the requirements changed"
    if stamp.get("llama_cpp_python") != llama_version():
        return "the llama-cpp-python pin changed"
    return None


def unpack_wheel(wheel: Path, site: Path) -> None:
    """A wheel installed by hand: its files into ``site``, a purelib/platlib .data dir merged in."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    for data in site.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                shutil.copytree(data / kind, site, dirs_exist_ok=True)
        shutil.rmtree(data)


def stage_site(work: Path) -> bool:
    """The aarch64 wheels and llama_cpp's bindings in work/daemon-site; False when it was already there."""
    site = work / "daemon-site"
    if site.exists() and stale_requirements(work) is None:
        return False
    reqs = requirements(work)
    wheels = work / "daemon-wheels"
    say(f"downloading the aarch64 wheels of {len(reqs)} requirements for Python {PYTHON_VERSION}")
    shutil.rmtree(wheels, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(wheels), *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Missing(f"pip download of the aarch64 wheels failed:\n{r.stderr[-2000:]}")
    tmp = work / "daemon-site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = sorted(p.name for p in wheels.glob("*.whl"))
    for name in names:
        unpack_wheel(wheels / name, tmp)
    shutil.copytree(llama_src(work) / "llama_cpp", tmp / "llama_cpp",
                    ignore=shutil.ignore_patterns("__pycache__", "lib"))
    (tmp / ".staged.json").write_text(json.dumps({"requirements": reqs, "llama_cpp_python": llama_version(),
                                                  "python": PYTHON_VERSION, "wheels": names}, indent=1))
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)  # whole or not at all: an interrupted staging leaves no half site behind
    shutil.rmtree(wheels, ignore_errors=True)
    say(f"staged {len(names)} wheels and llama_cpp {llama_version()} in {site}")
    return True


# -- the C extension ----------------------------------------------------------------------------


def python_headers(work: Path) -> Path:
    """Debian's arm64 Python 3.11 headers (Python.h and the aarch64 pyconfig.h), unpacked in work/daemon-build.

    The root's own python3.11 version is tried first; the mirror may have moved on to a later
    bookworm revision, whose headers are the same 3.11 ABI, named by this machine's apt.
    """
    dest = work / "daemon-build" / "python-headers"
    if (dest / "usr/include/aarch64-linux-gnu/python3.11/pyconfig.h").exists():
        return dest
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        raise Missing("aarch64-linux-gnu-gcc is not installed (Debian: gcc-aarch64-linux-gnu)")
    versions = [p.name.split("_")[1] for p in (work / "root/var/cache/apt/archives").glob("python3.11-minimal_*_arm64.deb")]
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", "libpython3.11-dev"], capture_output=True, text=True)
    versions += [line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("Version:")]
    deb = work / "daemon-build" / "libpython3.11-dev_arm64.deb"
    deb.parent.mkdir(parents=True, exist_ok=True)
    for v in dict.fromkeys(versions):
        url = f"{MIRROR}/pool/main/p/python3.11/libpython3.11-dev_{v.replace(':', '%3a')}_arm64.deb"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(deb, "wb") as out:
                shutil.copyfileobj(resp, out)
            break
        except OSError as e:
            say(f"{url}: {e}")
    else:
        raise Missing(f"could not fetch Debian's libpython3.11-dev arm64 package from {MIRROR} (tried {versions})")
    tmp = dest.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    deb.unlink()
    return dest


def build_hamming(work: Path) -> tuple[Path, bool]:
    """daemon/_hamming.c cross-compiled for aarch64, and whether it was built now (cached by source and flags)."""
    src = REPO / "daemon" / "_hamming.c"
    key = hashlib.sha256(src.read_bytes() + " ".join(HAMMING_FLAGS).encode()).hexdigest()[:16]
    out = work / "daemon-build" / f"_hamming-{key}{EXT_SUFFIX}"
    if out.exists():
        return out, False
    headers = python_headers(work)
    say("cross-compiling daemon/_hamming.c for aarch64")
    tmp = out.with_suffix(".tmp")
    subprocess.run(["aarch64-linux-gnu-gcc", *HAMMING_FLAGS, "-I", str(headers / "usr/include/python3.11"),
                    "-I", str(headers / "usr/include"), str(src), "-o", str(tmp)], check=True)
    tmp.rename(out)
    return out, True


# -- pocketembed itself -------------------------------------------------------------------------


def sync_package(work: Path, hamming: Path) -> int:
    """The checkout's pocketembed in work/daemon-pkg, as installed, with the aarch64 extension; files changed."""
    pkg = work / "daemon-pkg"
    want: dict[Path, Path] = {}
    for dest, src in PACKAGES.items():
        for f in (REPO / src).rglob("*"):
            rel = f.relative_to(REPO / src)
            if f.is_file() and "__pycache__" not in rel.parts and f.suffix not in (".so", ".pyc", ".c", ".o"):
                want[Path(dest) / rel] = f
    want[Path("pocketembed/daemon") / f"_hamming{EXT_SUFFIX}"] = hamming
    changed = 0
    for rel, src in want.items():
        dst = pkg / rel
        if dst.exists() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        changed += 1
    for f in list(pkg.rglob("*")):
        if f.is_file() and f.relative_to(pkg) not in want and f.name != ".synced":
            f.unlink()
            changed += 1
    (pkg / ".synced").touch()
    return changed


def stage(work: Path = WORK) -> dict:
    """Everything the daemon needs under emulation, in ``work``; what was done (nothing on a second run)."""
    why = missing(work, staged=False)
    if why:
        raise Missing(why)
    site = stage_site(work)
    hamming, hamming_fresh = build_hamming(work)
    changed = sync_package(work, hamming)
    return {"site_staged": site, "hamming": str(hamming), "hamming_built": hamming_fresh, "package_files_copied": changed}


# -- running under emulation --------------------------------------------------------------------


def interpreter(work: Path = WORK) -> list[str]:
    """The arm64 root's python3 under qemu-aarch64-static, as a command line to append arguments to."""
    root = work / "root"
    return ["qemu-aarch64-static", "-L", str(root), str(root / "usr/bin/python3")]


def command(*args: str, work: Path = WORK) -> list[str]:
    """The command line of ``python3 -m pocketembed.cli ARGS`` in the arm64 root under qemu."""
    return [*interpreter(work), "-m", "pocketembed.cli", *args]


def environment(work: Path = WORK, build: str = "dotprod", base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the aarch64 interpreter needs: the staged packages first, the ARM llama.cpp, qemu's CPU."""
    env = dict(os.environ if base is None else base)
    for var in ("PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(var, None)
    env.update({
        # The staged packages come before the root's Debian dist-packages (its numpy 1.24, jinja2, ...).
        "PYTHONPATH": f"{work / 'daemon-pkg'}:{work / 'daemon-site'}",
        "PYTHONNOUSERSITE": "1",
        # Nor the working directory first: in a checkout its pocketembed/ (without daemon/) would shadow the staged one.
        "PYTHONSAFEPATH": "1",
        # Bytecode beside neither the checkout nor the staged site: compiled once, emulated imports then load it.
        "PYTHONPYCACHEPREFIX": str(work / "daemon-pycache"),
        "LLAMA_CPP_LIB_PATH": str(work / f"lib-{build}"),
        # libllama's ggml libraries from the same directory, not from its RUNPATH (the cmake build tree).
        "LD_LIBRARY_PATH": str(work / f"lib-{build}"),
        "QEMU_CPU": env.get("QEMU_CPU", BUILDS[build]),
    })
    return env


CHECK = r"""
import json, platform, sys
import numpy as np
from pocketembed.daemon import llama_runtime as rt, quantize
import zmq, msgpack, msgspec, psutil, sqlite3
feats = rt.cpu_features()
codes = np.random.default_rng(0).integers(0, 2**63, size=(6, 5000), dtype=np.uint64)
q = codes[:, 17].copy()
c = quantize.hamming(codes, q)
print(json.dumps({
    "machine": platform.machine(), "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version,
    "hamming": None if quantize._hamming is None else quantize._hamming.__file__,
    "hamming_agrees": bool((c == quantize.hamming_numpy(codes, q)).all() and c[17] == 0),
    "modules": {m.__name__: m.__file__ for m in (np, zmq, msgpack, msgspec, psutil, rt.llama)},
    "features": sorted(k for k, v in feats.items() if v), "system_info": rt.system_info()}))
"""


def check(work: Path = WORK, build: str = "dotprod") -> dict:
    """Under emulation: the machine, where each module came from, llama.cpp's CPU features, the C scan."""
    r = subprocess.run([*interpreter(work), "-c", CHECK],
                       capture_output=True, text=True, env=environment(work, build), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"the aarch64 interpreter failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=WORK, help="the ARM work dir (default $POCKETEMBED_ARM_DIR or %(default)s)")
    ap.add_argument("--build", choices=list(BUILDS), default="dotprod", help="which cross-built llama.cpp (default %(default)s)")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("stage", help="stage the aarch64 site dir, the C extension and the package (idempotent)")
    sub.add_parser("check", help="stage, then report what the aarch64 interpreter loads (JSON)")
    for name, text in (("serve", "stage, then run `pocketembed serve ARGS...` under emulation"),
                       ("cli", "stage, then run `pocketembed ARGS...` under emulation")):
        sub.add_parser(name, help=text, add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    # What follows serve/cli is pocketembed's, verbatim (argparse would take its options for ours).
    i, head = 0, argv
    while i < len(argv):
        if argv[i] in ("--work", "--build"):
            i += 2
        elif argv[i] in ("serve", "cli"):
            head, rest = argv[: i + 1], argv[i + 1:]
            break
        else:
            i += 1
    else:
        rest = []
    a = ap.parse_args(head)
    try:
        done = stage(a.work)
    except Missing as e:
        say(str(e))
        return 3
    if a.what == "stage":
        nothing = not done["site_staged"] and not done["hamming_built"] and done["package_files_copied"] == 0
        say("nothing to do: already staged" if nothing else f"staged: {json.dumps(done)}")
        return 0
    if a.what == "check":
        print(json.dumps(check(a.work, a.build), indent=1))
        return 0
    args = ["serve", *rest] if a.what == "serve" else rest
    cmd = command(*args, work=a.work)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, environment(a.work, a.build))  # the daemon takes this process: signals reach it


if __name__ == "__main__":
    sys.exit(main())
