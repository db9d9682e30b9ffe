"""`classify --engine ray` (fmnist_onnx/classify/engines/ray.py) on real Ray runtimes, as users run it: a local
runtime that the CLI starts and stops itself, and a 2-CPU cluster started with `ray start` that the CLI joins.
Real PNG files from `data export-png`, real broken files, and the local engine's output as the reference."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fmnist_onnx.classify.contract import CRASHED
from fmnist_onnx.testing import CLASSIFY_AFTER_CHUNK, DIE_ON_ENV
from harness import Held, assert_one_line_error, run_cli, wait_for_exit

pytest.importorskip("ray", reason='the Ray engine needs the [ray] extra: pip install -e ".[ray]"')

from fmnist_onnx.table import read_rows  # noqa: E402

CUDA = "CUDAExecutionProvider" in pytest.importorskip("onnxruntime").get_available_providers()

TOP_K = "3"
NON_UTF8 = os.fsdecode(b"T-shirt-top/caf\xe9.png")  # a file name that is not UTF-8: rows keep it byte for byte


# ---------------------------------------------------------------------------------------------- helpers

def _uses(pid: str, marker: str) -> str | None:
    """The command line of process ``pid`` if the path ``marker`` is in it or in one of its open files."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone meanwhile, or not ours to look at
        return None
    if marker in cmd:
        return cmd
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(marker):
                return cmd
        except OSError:  # that file closed meanwhile: the others still count
            continue
    return None


def ray_processes(marker: str) -> list[str]:
    """Processes of the Ray session whose files live under ``marker``: the path is in their command line or in
    one of their open files (every Ray process logs into its session folder; setproctitle overwrites the
    environment of workers, so that is no use). Zombies have neither: they have exited."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if (cmd := _uses(pid, marker)) is not None:
            found.append(f"{pid} {cmd[:120]}")
    return found


def session_members(sid: int) -> list[int]:
    """Live processes (zombies have exited) of the session ``sid``: what a process started with
    start_new_session started in turn, unless it left the session (Ray's processes do not)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(pid))
    return found


def wait_until_gone(marker: str, timeout: float = 60) -> list[str]:
    """Block until no process of the Ray session under ``marker`` is left: wait for those found to exit
    (pidfds, no polling), then look again, since one may have started meanwhile. Returns those left when the
    timeout, a safety net, runs out."""
    deadline = time.monotonic() + timeout
    while left := ray_processes(marker):
        if time.monotonic() >= deadline:
            return left
        wait_for_exit([int(p.split()[0]) for p in left], deadline - time.monotonic())
    return []


def kill_all(marker: str, sid: int | None = None) -> list[str]:
    """SIGKILL every process of the Ray session under ``marker`` (and of the process session ``sid``), until
    none is left; returns what is left after all that (should be nothing)."""
    for _ in range(5):  # a process may start another while dying: look again after each round
        pids = {int(p.split()[0]) for p in ray_processes(marker)} | set(session_members(sid) if sid else [])
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for_exit(pids, 30)
    return ray_processes(marker) + [f"{pid} (session {sid})" for pid in (session_members(sid) if sid else [])]


def journal_rows(journal: Path) -> int:
    try:
        return journal.read_bytes().count(b"\n") - 1  # less the CSV header
    except FileNotFoundError:
        return 0


def by_path(rows) -> dict[str, dict]:
    rows = list(rows)
    out = {r["path"]: r for r in rows}
    assert len(out) == len(rows), "a file has more than one row"
    return out


def assert_same_rows(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Same files; for each, the same top-3 labels (or the same error) and the same scores."""
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        g = got[path]
        assert g["error"] == w["error"], path
        assert [g["label"], g["label_2"], g["label_3"]] == [w["label"], w["label_2"], w["label_3"]], path
        if w["error"] is None:
            assert g["score"] == pytest.approx(w["score"], abs=1e-5), path


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """300 test images in the ImageFolder layout, plus files no engine can classify, and one to skip."""
    root = tmp_path_factory.mktemp("ray_in") / "images"
    run_cli("data", "export-png", "--out", root, "--limit", "300", "--quiet", check=True)
    a_png = next((root / "Coat").glob("*.png")).read_bytes()
    (root / "Bag" / "not_an_image.png").write_text("these are not the pixels you are looking for")
    (root / "Coat" / "truncated.png").write_bytes(a_png[:60])
    (root / "Dress" / "empty.png").write_bytes(b"")
    (root / "Sandal" / "dangling.png").symlink_to(root / "no-such-file.png")
    (root / NON_UTF8).write_bytes(a_png)
    from PIL import Image

    Image.new("RGB", (90, 60), (250, 250, 250)).save(root / "Shirt" / "photo.jpg")  # not 28x28: resized
    (root / "notes.txt").write_text("not an image: skipped, no row")
    return root


@pytest.fixture(scope="module")
def model(onnx_model) -> Path:
    return onnx_model


@pytest.fixture(scope="module")
def local_rows(folder, model, tmp_path_factory) -> dict[str, dict]:
    """The local engine's rows: the reference."""
    out = tmp_path_factory.mktemp("ray_local") / "local.csv"
    proc = run_cli("classify", folder, "-m", model, "-o", out, "-k", TOP_K, "-q")
    assert proc.returncode == 3, proc.stderr  # some files failed
    return by_path(read_rows(out))


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """An environment of our own for Ray: its files (sockets, logs; a short path, sockets are limited to 107
    bytes) and its token (~/.ray) in temporary folders, and no $RAY_ADDRESS from the caller."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    home = tmp_path_factory.mktemp("ray_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(tmp), HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_TOKEN=secrets.token_hex(32))  # the cluster's and the CLI's token, as on a real cluster
    yield env, str(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_runtime_run(folder, model, ray_env, tmp_path_factory):
    """One `classify --engine ray` with no address: the CLI starts a local Ray runtime and stops it."""
    env, tmp = ray_env
    out = tmp_path_factory.mktemp("ray_out") / "ray.csv"
    proc = run_cli("classify", folder, "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray", env=env)
    return proc, out, tmp


@pytest.fixture(scope="module")
def cluster(ray_env, tmp_path_factory):
    """A Ray cluster of 2 CPUs, started with `ray start --head` as on a real head node; stopped at the end
    (its own processes only: `ray stop` would stop every Ray on the machine), none left behind. It declares 1 GPU:
    GPU actors are then scheduled, and meet onnxruntime's missing CUDA for real, or use the GPU where there is one."""
    env, _ = ray_env
    marker = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    head_env = {**env, "RAY_TMPDIR": marker, "RAY_AUTH_MODE": "token"}
    with socket.socket() as s:  # a free port for the head's GCS
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2", "--num-gpus=1",
         f"--port={port}", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={marker}/ray"],
        env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address, lines = None, []
    deadline = time.monotonic() + 120
    while address is None and time.monotonic() < deadline:
        line = head.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "--address=" in line:  # "ray start --address='192.0.2.2:6379'": how workers join
            address = line.split("--address=", 1)[1].split()[0].strip("'\"")
    try:
        assert address, "ray start did not report an address:\n" + "".join(lines)
        # an explicit address: Ray sends its token only when told that the cluster wants one
        yield address, {**env, "RAY_AUTH_MODE": "token"}, marker
    finally:
        # `ray start --block` stops what it started on SIGTERM, in its own time (long, on a loaded machine);
        # then whatever is left is killed: every process of the head's session (all of Ray's stay in it, the
        # agents whose names setproctitle changed too) and every process with files under the marker.
        # Not `ray stop`: it would stop every Ray on the machine.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        left = kill_all(marker, head.pid)
        head.wait(60)
        head.stdout.close()
        shutil.rmtree(marker, ignore_errors=True)
        assert not left, f"the cluster's processes outlived it: {left}"


# ---------------------------------------------------------------------------------------------- local runtime

def test_ray_engine_gives_the_local_engines_rows_and_exit_code(local_runtime_run, local_rows):
    proc, out, _ = local_runtime_run
    assert proc.returncode == 3, proc.stderr  # the broken files: as the local engine
    assert "Traceback" not in proc.stderr
    assert_same_rows(by_path(read_rows(out)), local_rows)


def test_ray_engine_writes_one_row_per_file(local_runtime_run, folder):
    _, out, _ = local_runtime_run
    files = [p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p.suffix != ".txt"]
    rows = list(read_rows(out))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in files)
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"not_an_image.png", "truncated.png", "empty.png", "dangling.png"}
    assert "dangling" in errors["dangling.png"]


def test_local_runtime_is_stopped_with_no_process_left(local_runtime_run):
    proc, _, tmp = local_runtime_run
    sessions = list((Path(tmp) / "ray").glob("session_2*"))
    assert sessions, f"Ray did not run under {tmp}: nothing was tested\n{proc.stderr}"
    assert wait_until_gone(tmp) == []


def test_a_run_that_goes_well_prints_only_our_own_lines(folder, model, ray_env, tmp_path):
    """Quiet success: no line of Ray's on stderr, such as the core_worker.cc error that Ray Data's actor pool
    makes on every run (ray-project/ray#57733), or its warning about actors left without work (10 files are one
    block: fewer than this machine's actors, where there are 2 cores or more). -v shows them."""
    env, _ = ray_env
    small = tmp_path / "small"
    small.mkdir()
    for png in sorted(p for p in (folder / "Trouser").glob("*.png") if p.stem.isdigit())[:10]:
        shutil.copy(png, small / png.name)
    proc = run_cli("classify", small, "-m", model, "-o", tmp_path / "p.csv", "--engine", "ray", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["classified"] == 10  # and nothing else on stdout
    # progress.py's lines
    ours = re.compile(r"provider: \w+ \(auto\)|classify: [\d,]+ images, ([\d,]+ images/s, )?\d+ s")
    assert [line for line in proc.stderr.splitlines() if not ours.fullmatch(line)] == [], proc.stderr


def test_an_address_where_nothing_answers_is_one_line_at_once(folder, model, tmp_path):
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        proc = run_cli("classify", folder, "-m", model, "-o", tmp_path / "p.csv", "--engine", "ray", "--ray-address",
                       address, timeout=60)  # not Ray's minutes of retries
    assert_one_line_error(proc, 2, f"cannot connect to the Ray cluster at {address}")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_runtime_and_resume_finishes(test_pngs, model, ray_env, tmp_path):
    env, _ = ray_env
    tmp = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # this run's own Ray files, to find its processes
    env = {**env, "RAY_TMPDIR": tmp}
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(test_pngs), "-m", str(model), "-o", str(out),
           "--engine", "ray", "--actors", "1"]
    journal = tmp_path / "preds.csv.partial"
    try:
        # held (fmnist_onnx/testing.py) once the first block's rows are in the journal: Ctrl-C lands mid-run
        with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:1", env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                  stderr=subprocess.PIPE, text=True) as held:
            held.wait()
            written = journal_rows(journal)
            os.killpg(held.proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, as in a terminal
            _, stderr = held.proc.communicate(timeout=120)
        assert held.proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "--resume" in stderr
        assert 0 < written == journal_rows(journal) < 10000
        assert wait_until_gone(tmp) == [], "Ctrl-C left Ray processes behind"

        resumed = run_cli("classify", test_pngs, "-m", model, "-o", out, "--engine", "ray", "--resume", "--json",
                          env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["resumed"] == written
    finally:
        kill_all(tmp)  # after a failure: no Ray left running for the next tests
        shutil.rmtree(tmp, ignore_errors=True)
    local = tmp_path / "local.csv"
    run_cli("classify", test_pngs, "-m", model, "-o", local, "-q", check=True)
    got = {p: r["index"] for p, r in by_path(read_rows(out)).items()}  # each file once, and the local labels
    assert got == {r["path"]: r["index"] for r in read_rows(local)}


# ---------------------------------------------------------------------------------------------- existing cluster

def test_cluster_parquet_rows_match_and_cluster_keeps_running(cluster, folder, model, local_rows, tmp_path):
    address, env, marker = cluster
    out = tmp_path / "preds.parquet"
    # 3 actors on 2 CPUs: fractional CPUs, and it must still finish (ray-project/ray#44687)
    proc = run_cli("classify", folder, "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray",
                   "--ray-address", address, "--provider", "cpu", "--actors", "3", "--json", env=env)
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["workers"] == 3 and summary["failed"] == 4
    assert_same_rows(by_path(read_rows(out)), local_rows)  # names that are not UTF-8 too (table.py)
    assert ray_processes(marker), "the CLI stopped a cluster it only joined"


def test_cluster_resume_writes_each_file_once(cluster, folder, model, local_rows, tmp_path):
    address, env, _ = cluster
    out = tmp_path / "preds.jsonl"
    # a local run killed (SIGKILL) once its first chunk is in the journal...
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", str(folder), "-m", str(model), "-o", str(out), "-k",
           TOP_K, "--workers", "1"]
    with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:1", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL) as held:
        held.wait()
        os.killpg(held.proc.pid, signal.SIGKILL)
        held.proc.wait()
    done = (tmp_path / "preds.jsonl.partial").read_bytes()
    assert 0 < done.count(b"\n") < len(local_rows) and not out.exists()
    # ...finished on the cluster
    proc = run_cli("classify", folder, "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray",
                   "--ray-address", address, "--provider", "cpu", "--actors", "1", "--resume", "--json", env=env)
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["resumed"] == done.count(b"\n")
    assert out.read_bytes().startswith(done)
    assert_same_rows(by_path(read_rows(out)), local_rows)


def test_cluster_reads_file_uris_through_pyarrow(cluster, folder, model, local_rows, tmp_path):
    address, env, _ = cluster
    out = tmp_path / "preds.csv"
    proc = run_cli("classify", f"file://{folder}", "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray",
                   "--ray-address", address, "--provider", "cpu", env=env)
    assert proc.returncode == 3, proc.stderr
    rows = by_path(read_rows(out))
    assert all(p.startswith(f"file://{folder}/") for p in rows)
    # The differences from plain paths: pyarrow does not list dangling links, and cannot name a file whose
    # name is not UTF-8 (it gets an error row with a stand-in path).
    unnamed = [p for p, r in rows.items() if "not UTF-8" in (r["error"] or "")]
    assert len(unnamed) == 1
    want = {p: r for p, r in local_rows.items() if not p.endswith(("dangling.png", NON_UTF8))}
    assert_same_rows({p.removeprefix("file://"): r for p, r in rows.items() if p not in unnamed}, want)


def test_cluster_classifies_parquet_rows_as_the_local_engine(cluster, model, tmp_path):
    """Images inside a container (contract.Members) go to the actors by position, with the classes it knows."""
    address, env, _ = cluster
    run_cli("data", "export-png", "--format", "parquet", "--limit", "200", "--out", tmp_path / "data", "--quiet",
            check=True)
    (table,) = (tmp_path / "data").glob("*.parquet")
    local, out = tmp_path / "local.csv", tmp_path / "ray.csv"
    run_cli("classify", table, "-m", model, "-o", local, "-k", TOP_K, "-q", check=True)
    proc = run_cli("classify", table, "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray", "--ray-address",
                   address, "--provider", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr
    got, want = by_path(read_rows(out)), by_path(read_rows(local))
    assert len(got) == 200 and all("::row/" in p for p in got)
    assert_same_rows(got, want)
    assert {p: r["true_label"] for p, r in got.items()} == {p: r["true_label"] for p, r in want.items()}


@pytest.mark.skipif(CUDA, reason="onnxruntime has CUDA here: see test_gpu_actors_classify_as_the_cpu_does")
def test_gpu_actors_without_cuda_are_one_clear_error(cluster, folder, model, tmp_path):
    address, env, _ = cluster
    proc = run_cli("classify", folder, "-m", model, "-o", tmp_path / "x.csv", "--engine", "ray",
                   "--ray-address", address, "--provider", "cuda", env=env)
    assert "provider: cuda" in proc.stderr  # the cluster has a GPU: the actors asked for it...
    assert_one_line_error(proc, 2, "CUDAExecutionProvider")  # ...and their onnxruntime has no CUDA
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.csv.partial").exists()


@pytest.mark.skipif(not CUDA, reason="onnxruntime has no CUDAExecutionProvider here")
def test_gpu_actors_classify_as_the_cpu_does(cluster, folder, model, local_rows, tmp_path):
    address, env, _ = cluster
    out = tmp_path / "gpu.csv"
    proc = run_cli("classify", folder, "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray", "--ray-address",
                   address, "--provider", "cuda", "--json", env=env)
    assert proc.returncode == 3, proc.stderr  # the broken files, as on the CPU
    assert "provider: cuda" in proc.stderr and json.loads(proc.stdout)["provider"] == "cuda"
    got = by_path(read_rows(out))
    assert sorted(got) == sorted(local_rows)
    assert all(got[p]["error"] == r["error"] for p, r in local_rows.items())
    ok = [p for p, r in local_rows.items() if r["error"] is None]
    assert sum(got[p]["index"] != local_rows[p]["index"] for p in ok) <= 1  # fp32 on both: a near-tie at most
    assert max(abs(got[p]["score"] - local_rows[p]["score"]) for p in ok) < 1e-3


# ---------------------------------------------------------------------------------------------- sizing

@pytest.mark.parametrize("resources, provider, actors, want", [
    ({"CPU": 2}, "auto", None, ("cpu", 2, 0.75, 0.0)),  # 0.5 CPU left for other Ray work (ray#44687)
    ({"CPU": 2}, "cpu", 3, ("cpu", 3, 0.5, 0.0)),
    ({"CPU": 64}, "cpu", None, ("cpu", 64, 0.95, 0.0)),  # 5% left on big clusters
    ({"CPU": 16, "GPU": 1}, "auto", None, ("cuda", 1, 1.0, 1.0)),
    ({"CPU": 16, "GPU": 2}, "cuda", 8, ("cuda", 8, 1.0, 0.25)),  # more decoding processes than GPUs
])
def test_pool_leaves_cpu_for_ray_data(resources, provider, actors, want):
    from fmnist_onnx.classify.engines.ray import plan_pool

    assert plan_pool(resources, provider, actors) == pytest.approx(want)


@pytest.mark.parametrize("resources, provider, actors, contains", [
    ({"CPU": 2}, "cuda", None, "no GPU"),
    ({"CPU": 0.5}, "cpu", None, "too few"),
])
def test_pool_that_cannot_be_is_one_clear_error(resources, provider, actors, contains):
    from fmnist_onnx.classify.engines.ray import plan_pool
    from fmnist_onnx.errors import UserError

    with pytest.raises(UserError, match=contains):
        plan_pool(resources, provider, actors)


# ---------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("args, contains", [
    (["--actors", "2"], "--engine ray"),
    (["--ray-address", "auto"], "--engine ray"),
    (["--engine", "ray", "--workers", "2"], "--actors"),
])
def test_engine_options_go_with_their_engine(folder, model, args, contains):
    proc = run_cli("classify", folder, "-m", model, *args)
    assert_one_line_error(proc, 2, contains)


@pytest.fixture(scope="module")
def containers(folder, tmp_path_factory) -> list[Path]:
    """The folder's good PNGs as a tar (ImageFolder layout inside), a tar.gz and a Parquet file of the Hugging
    Face layout: every source that reads by position, or from bytes carried along."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("ray_containers")
    pngs = sorted(p for p in folder.rglob("*.png")
                  if p.parent != folder and p.is_file() and p.stat().st_size > 100)[:120]
    named = [(str(p.relative_to(folder)), p.read_bytes()) for p in pngs]
    for name, mode in (("a.tar", "w"), ("b.tar.gz", "w:gz")):
        with tarfile.open(d / name, mode) as tar:
            for member, data in named:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": n} for n, b in named]),
                             "label": pa.array([0] * len(named), pa.int64())}), d / "c.parquet", row_group_size=50)
    return [d / "a.tar", d / "b.tar.gz", d / "c.parquet"]


def test_cluster_reads_archives_and_parquet_and_resumes_a_local_run(cluster, containers, model, tmp_path):
    address, env, _ = cluster
    want = by_path(read_rows(_local(containers, model, tmp_path / "local.csv")))
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "fmnist_onnx", "classify", *map(str, containers), "-m", str(model), "-o",
           str(out), "-k", TOP_K, "--workers", "1"]
    with Held(cmd, f"{CLASSIFY_AFTER_CHUNK}:1", start_new_session=True, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL) as held:
        held.wait()
        os.killpg(held.proc.pid, signal.SIGKILL)
        held.proc.wait()
    proc = run_cli("classify", *containers, "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray",
                   "--ray-address", address, "--provider", "cpu", "--resume", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert 0 < json.loads(proc.stdout)["resumed"] < len(want) == 360
    got = by_path(read_rows(out))
    assert_same_rows(got, want)
    assert [got[p]["true_label"] for p in want] == [w["true_label"] for w in want.values()]


def test_cluster_reads_a_folder_of_shards_and_a_pattern_as_their_shards_named(cluster, containers, model, tmp_path):
    """The driver takes the inputs the local engine takes: the containers' folder (nothing else in it: a
    folder of shards), and a brace pattern naming them, give the rows of the shards named one by one."""
    address, env, _ = cluster
    want = by_path(read_rows(_local(containers, model, tmp_path / "local.csv")))
    folder = containers[0].parent
    for name, given in (("folder", folder), ("pattern", f"{folder}/{{a.tar,b.tar.gz,c.parquet}}")):
        out = tmp_path / f"{name}.csv"
        proc = run_cli("classify", given, "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray", "--ray-address",
                       address, "--provider", "cpu", env=env)
        assert proc.returncode == 0, proc.stderr
        assert_same_rows(by_path(read_rows(out)), want)


def test_cluster_reads_the_image_column_as_the_local_engine(cluster, folder, model, tmp_path):
    """--image-column reaches the actors (in the Members they read): a table of two binary columns, the images
    in the named one and the same images reversed in the other, gives the local engine's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    address, env, _ = cluster
    data = [p.read_bytes() for p in sorted(folder.rglob("*.png"))
            if p.parent != folder and p.is_file() and p.stat().st_size > 100][:100]
    table = tmp_path / "two.parquet"
    pq.write_table(pa.table({"thumb": pa.array(data[::-1], pa.binary()), "png": pa.array(data, pa.binary())}),
                   table, row_group_size=25)
    local, out = tmp_path / "local.csv", tmp_path / "ray.csv"
    run_cli("classify", table, "--image-column", "png", "-m", model, "-o", local, "-k", TOP_K, "-q", check=True)
    proc = run_cli("classify", table, "--image-column", "png", "-m", model, "-o", out, "-k", TOP_K, "--engine",
                   "ray", "--ray-address", address, "--provider", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr
    got = by_path(read_rows(out))
    assert len(got) == 100 and all(r["error"] is None for r in got.values())
    assert_same_rows(got, by_path(read_rows(local)))


def test_cluster_run_killed_then_resumed_gives_each_member_once(cluster, containers, model, tmp_path):
    """A Ray-engine run SIGKILLed once its first chunk is in the journal (the rows of chunks done on the actors
    meanwhile die with the driver), finished by a Ray-engine --resume: no member or row lost, none twice."""
    address, env, _ = cluster
    inputs = [containers[0], containers[2]]  # a tar shard and a Parquet file
    want = by_path(read_rows(_local(inputs, model, tmp_path / "local.csv")))
    out = tmp_path / "preds.csv"
    args = [*map(str, inputs), "-m", str(model), "-o", str(out), "-k", TOP_K, "--engine", "ray", "--ray-address",
            address, "--provider", "cpu"]
    with Held([sys.executable, "-m", "fmnist_onnx", "classify", *args], f"{CLASSIFY_AFTER_CHUNK}:1", env=env,
              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as held:
        held.wait()
        os.killpg(held.proc.pid, signal.SIGKILL)  # the driver, with no chance to clean up
        assert held.proc.wait() == -signal.SIGKILL
    done = journal_rows(tmp_path / "preds.csv.partial")
    proc = run_cli("classify", *args, "--resume", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert 0 < json.loads(proc.stdout)["resumed"] == done < len(want) == 240
    assert_same_rows(by_path(read_rows(out)), want)


def test_an_actor_that_dies_on_a_member_costs_that_member_alone(cluster, containers, model, tmp_path):
    """An actor killed (as by a decoder crash) on one member, on every try: its chunk is tried again, then member
    by member; that member gets the crash's error row, every other member its row. The test's crash point
    (testing.py) reaches the cluster's actors through their runtime_env: they do not inherit the CLI's environment."""
    address, env, _ = cluster
    want = by_path(read_rows(_local(containers[:1], model, tmp_path / "local.csv")))
    culprit = sorted(want)[len(want) // 2]  # in a chunk of many: the others in it must not go with it
    out = tmp_path / "preds.csv"
    proc = run_cli("classify", containers[0], "-m", model, "-o", out, "-k", TOP_K, "--engine", "ray",
                   "--ray-address", address, "--provider", "cpu", "--json", env={**env, DIE_ON_ENV: culprit})
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["failed"] == 1  # stdout is the summary alone: no line of Ray's about the death
    got = by_path(read_rows(out))
    assert got.pop(culprit)["error"] == CRASHED
    del want[culprit]
    assert_same_rows(got, want)


def _local(inputs: list[Path], model: Path, out: Path) -> Path:
    proc = run_cli("classify", *inputs, "-m", model, "-o", out, "-k", TOP_K, "-q")
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_engine_joins_no_cluster_until_with(model):
    """Made, the Ray engine has checked its options and the model and connected to nothing; close() before
    ``with``, and again, is nothing."""
    import ray

    from fmnist_onnx.classify.contract import Request
    from fmnist_onnx.classify.engines.ray import RayEngine

    request = Request(["x"], str(model), "-", "csv", 1, None, "auto", True, False, False, "cpu", None)
    engine = RayEngine(request)
    assert not ray.is_initialized() and engine.pool is None
    engine.close()
    engine.close()
    assert not ray.is_initialized()
