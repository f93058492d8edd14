"""An installed package (a built wheel, not the source tree) builds its C++ extension and runs the cpp backend."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import dsc_kernels
from dsc_kernels import _ext

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, **kwargs):
    # Without PYTHONPATH: a source tree on the path (and the egg-info a wheel build leaves in it) would stand in for
    # the installed package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.skipif(not _ext.available(), reason="the C++ extension does not build here")
def test_wheel_installs_into_a_fresh_venv_and_runs_cpp_forward_and_backward(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)])
    wheel = next((tmp_path / "dist").glob("dsc_kernels-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    # torch and the other dependencies come from this interpreter's site-packages (a .pth line adds the folder
    # without running its .pth files, so the editable install of the source tree stays out of the way).
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = textwrap.dedent("""
        import torch, dsc_kernels, dsc_kernels.functional as DF
        from pathlib import Path
        assert "site-packages" in dsc_kernels.__file__, dsc_kernels.__file__
        assert (Path(dsc_kernels.__file__).parent / "csrc" / "cpu").is_dir()
        x = torch.randn(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        z = DF.conv_ista(x, w, 0.1, n_iter=3, step=0.05, padding=1, backend="cpp")
        gx, gw = torch.autograd.grad(z.square().sum(), (x, w))
        zr = DF.conv_ista(x, w, 0.1, n_iter=3, step=0.05, padding=1, backend="reference")
        rx, rw = torch.autograd.grad(zr.square().sum(), (x, w))
        for a, b in ((z, zr), (gx, rx), (gw, rw)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        print("ok", dsc_kernels.__version__)
    """)
    out = _run([str(python), "-c", script], cwd=tmp_path)
    assert out.strip() == f"ok {dsc_kernels.__version__}"


def test_build_files_hold_no_checkout_path():
    """The extension is built from a content-keyed copy of the sources, so another checkout reuses the build."""
    if not _ext.available():
        pytest.skip("the C++ extension does not build here")
    build_dir = _ext._build_dir(_ext._sources(), _ext._cflags())
    ninja = (build_dir / "build.ninja").read_text()
    assert str(ROOT / "csrc") not in ninja and str(ROOT / "dsc_kernels") not in ninja
    assert str(build_dir / "src") in ninja


def test_version_flag():
    out = _run([sys.executable, "-m", "dsc_kernels", "--version"], cwd=ROOT)
    assert out.strip() == f"dsc_kernels {dsc_kernels.__version__}"


def test_a_missing_compiler_is_named_in_the_build_error(tmp_path):
    """Without a compiler on PATH the error named torch's "Error building extension ...: [1/9] c++ -MMD ..." line,
    a whole compile command, and never said that c++ was not found."""
    bindir = Path(sys.executable).parent  # _ext puts it on PATH (the venv's ninja)
    if any((bindir / cc).exists() for cc in ("c++", "g++")) or not (
        (bindir / "ninja").exists() or shutil.which("ninja")
    ):
        pytest.skip("needs ninja without a compiler beside it")
    path = tmp_path / "bin"
    path.mkdir()
    if not (bindir / "ninja").exists():
        (path / "ninja").symlink_to(shutil.which("ninja"))
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env.update(PATH=str(path), DSC_KERNELS_CACHE=str(tmp_path / "cache"))
    script = "from dsc_kernels import _ext; print(_ext.available()); print(_ext.build_error())"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    ).stdout.splitlines()
    assert out[0] == "False"
    assert "c++: not found" in out[1] and "-MMD" not in out[1], out[1]


@pytest.fixture
def fresh_load(monkeypatch):
    """_ext.load without its per-process cache and error, so a test can run it again."""
    monkeypatch.setattr(_ext, "_error", None)
    return _ext.load.__wrapped__


def _refuse_like_a_read_only_folder(*args, build_directory, **kwargs):
    # torch's load creates its lock marker in the build folder first: in a read-only one that raises this
    raise PermissionError(13, "Permission denied", os.path.join(build_directory, "lock"))


def test_a_failed_build_is_not_retried_by_a_thread_that_waited_for_it(monkeypatch, fresh_load):
    """Two threads' first fused calls both enter load (functools.cache does not serialise them); the second waited
    for the first's build under the lock and, when it failed, ran the failing build again (twice the wait for the
    same error), though a failed build is not retried within a process."""
    import threading
    import time

    from torch.utils import cpp_extension

    calls = []

    def failing_build(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)
        raise RuntimeError("x.cpp:1: error: boom")

    monkeypatch.setattr(cpp_extension, "load", failing_build)
    errors, start = [], threading.Barrier(2)

    def first_call():
        start.wait()
        try:
            fresh_load()
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=first_call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 2 and all("boom" in e for e in errors)
    assert len(calls) == 1


def test_a_finished_build_in_a_read_only_cache_loads(monkeypatch, fresh_load):
    """A prebuilt read-only cache (an image's, another user's) was unusable: torch's load could not create its lock
    marker there, and the error blamed the compiler."""
    if not _ext.available():
        pytest.skip("the C++ extension does not build here")
    from torch.utils import cpp_extension

    build_dir = _ext._build_dir(_ext._sources(), _ext._cflags())  # the session's build: nothing is rebuilt
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: not (mode & os.W_OK and Path(p) == build_dir) and access(p, mode, **kw)
    )
    monkeypatch.setattr(cpp_extension, "load", _refuse_like_a_read_only_folder)
    assert fresh_load() is torch.ops.dsc_kernels
    assert _ext.build_error() is None


def test_an_unwritable_cache_is_named_rather_than_the_compiler(monkeypatch, fresh_load, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("DSC_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", _refuse_like_a_read_only_folder)
    with pytest.raises(RuntimeError, match="cache folder is not writable.*DSC_KERNELS_CACHE") as err:
        fresh_load()
    assert "compiler" not in str(err.value)


def test_a_wheel_holds_no_cpp_source_left_in_build_by_an_earlier_build(tmp_path):
    """setup.py copied csrc/ over build/lib's copy, so a C++ file renamed or deleted since the last build stayed in
    the wheel (and would be compiled into the extension beside its successor)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("csrc", "dsc_kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    stale = src / "build" / "lib" / "dsc_kernels" / "csrc" / "cpu" / "renamed_since.cpp"
    stale.parent.mkdir(parents=True)
    stale.write_text("// a source the last build copied\n")
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=src,
    )
    with zipfile.ZipFile(next(tmp_path.glob("dsc_kernels-*.whl"))) as wheel:
        names = wheel.namelist()
    assert "dsc_kernels/csrc/cpu/ml_ista.cpp" in names
    assert not [n for n in names if n.endswith("renamed_since.cpp")]


def test_ninja_is_found_where_its_package_installed_it(monkeypatch, fresh_load, tmp_path):
    """The ninja package's executable was looked for on PATH and beside sys.executable only: a --user install
    (~/.local/bin, often not on PATH) got "Ninja is required to load C++ extensions (pip install ninja ...)"."""
    ninja = pytest.importorskip("ninja")
    real = shutil.which("ninja")
    if real is None:
        pytest.skip("no ninja executable here")
    from torch.utils import cpp_extension

    user_bin = tmp_path / "user-bin"
    user_bin.mkdir()
    (user_bin / "ninja").symlink_to(real)
    monkeypatch.setattr(ninja, "BIN_DIR", str(user_bin), raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python-bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("DSC_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: cpp_extension.verify_ninja_availability())
    assert fresh_load() is torch.ops.dsc_kernels


@pytest.fixture
def site_packages_in_a_users_repository(tmp_path):
    """site-packages of a virtual environment kept inside a user's own git repository (a project's .venv)."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@example.com"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "the user's project"], check=True, cwd=tmp_path)
    site = tmp_path / ".venv" / "lib" / "site-packages"
    (site / "dsc_kernels").mkdir(parents=True)
    return site


def test_an_installed_package_records_no_commit_of_the_repository_around_it(
    monkeypatch, site_packages_in_a_users_repository
):
    """Installed, the bench records and REPORT.md took the commit of the repository that held the environment
    (git rev-parse from site-packages) as the commit of the code that ran."""
    from dsc_kernels import report
    from dsc_kernels.experiments import records

    site = site_packages_in_a_users_repository
    monkeypatch.delenv("DSC_GIT_COMMIT", raising=False)
    monkeypatch.setattr(records, "ROOT", site)
    monkeypatch.setattr(report, "__file__", str(site / "dsc_kernels" / "report.py"))
    assert records.git_commit() == "unknown"
    assert report.machine_facts("cpu")["commit"] == "unknown"


@pytest.mark.parametrize("value", ["", "~/elsewhere"])
def test_the_cache_variable_empty_or_with_a_tilde_names_no_folder_in_the_current_one(monkeypatch, tmp_path, value):
    """DSC_KERNELS_CACHE= (empty) put the build in the current folder (Path("")), and a quoted "~/..." in a
    folder named "~" there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DSC_KERNELS_CACHE", value)
    monkeypatch.chdir(tmp_path)
    build_dir = _ext._build_dir(_ext._sources(), _ext._cflags())
    expected = tmp_path / "home" / (".cache/dsc_kernels" if value == "" else "elsewhere")
    assert build_dir.parent == expected and (build_dir / "src").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_the_build_key_holds_the_torch_version_and_the_flags(monkeypatch, tmp_path):
    """A build compiled against another torch, or with other flags (the sanitizer's), must never be reused."""
    monkeypatch.setenv("DSC_KERNELS_CACHE", str(tmp_path))
    sources, flags = _ext._sources(), ["-O3"]
    first = _ext._build_dir(sources, flags)
    assert _ext._build_dir(sources, flags) == first
    assert _ext._build_dir(sources, [*flags, "-fsanitize=address"]) != first
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert _ext._build_dir(sources, flags) != first


@pytest.mark.skipif(_ext.fcntl is None, reason="no advisory locks here")
def test_a_live_builds_marker_is_left_alone(tmp_path):
    """Only a marker left by a dead build is stale: while another holder of the build lock is building, a second
    load waits for it and leaves its marker in place."""
    import threading

    building, done = threading.Event(), threading.Event()
    seen = []

    def builder():
        with _ext._exclusive(tmp_path):
            (tmp_path / "lock").touch()  # torch's marker of a build in progress
            building.set()
            done.wait(10)
            seen.append((tmp_path / "lock").exists())
            (tmp_path / "lock").unlink()

    first = threading.Thread(target=builder)
    first.start()
    assert building.wait(10)

    def waiter():
        with _ext._exclusive(tmp_path):
            pass

    second = threading.Thread(target=waiter)
    second.start()
    second.join(0.5)  # waiting on the lock, or (wrongly) already past it, having removed the marker
    done.set()
    first.join(10)
    second.join(10)
    assert seen == [True]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_loaded_the_extension_loads_it():
    """_ext.load holds its lock for the whole load (a minute while building) and the op registry's lock is held
    around it. A child forked then (DataLoader workers) inherited both held by a thread that does not exist there,
    and its first fused call waited forever: a thread's first call forked 40 ms in hung the child.

    The fork happens in a fresh interpreter: forked from the test process after the rest of the suite (its OpenMP
    pools, compile workers), the child's load hung on CI for another reason than these locks."""
    if not _ext.available():
        pytest.skip("the C++ extension does not build here")
    script = textwrap.dedent(
        """
        from helpers import child_exit_code_forked_under_held_locks
        from dsc_kernels import _ext
        from dsc_kernels.ops import registry

        _ext.load()  # the cached build; the child below loads it again itself

        def child():
            _ext.load.__wrapped__()  # a load this child makes itself, as one forked mid-load does
            with registry._LOCK:
                return True

        print(child_exit_code_forked_under_held_locks([registry._LOCK, _ext._LOCK], child))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    code = int(out.stdout.split()[-1])
    assert code != -1, "the forked child hung on a lock its parent's thread held at the fork"
    assert code == 0
