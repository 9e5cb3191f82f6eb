"""Nothing lost (docs/robustness.md), through the real command line: one run per folder, preemption that saves, checkpoints and packs
that prove their integrity, environment failures as one line, a bounded wait for a silent peer.

Every run is a tiny sphere4 / 32-d embedding / batch 4 job on 20 synthetic identities (1 torch thread in
every process, so an interrupted-and-resumed run can be compared bit for bit with an uninterrupted one).
Processes are waited for through markers (lines of ``metrics.jsonl``, files, exit), never through a
wall-clock assertion.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "face" / "cpu_smoke.yaml"
EXIT = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 0}
N_REF = 10  # iterations of the uninterrupted reference runs
WAIT = 400  # seconds: a generous bound for a marker on a busy machine (never asserted as a duration)


def _overrides(out, cache, iters, every=1000, extra=()):
    return [f"out_dir={out}", f"train.iterations={iters}", "train.batch_size=4", "train.seed=3", "train.precision=fp32",
            f"checkpoint.every={every}", "checkpoint.keep=0", "model.embedding_dim=32",
            f"data.synthetic.cache_dir={cache}", "data.synthetic.num_identities=20",
            "data.synthetic.images_per_identity=3", "data.synthetic.pairs_per_fold=2", "train.log_every=1",
            "train.tensorboard=false", "data.num_workers=0", "eval.pairs=", "train.device=cpu", *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPHEREFACE_PLUS_", "TORCHELASTIC_"))}
    # train.compile=auto stays eager, as in this process (tests/conftest.py): the runs compared bit for bit
    # must take the same kernels
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SPHEREFACE_PLUS_PROGRESS="0",
               SPHEREFACE_PLUS_COMPILE_AUTO="eager", **extra)
    return env


def _start(args, env=None, module="sphereface_plus", command=("train",)):
    return subprocess.Popen([sys.executable, "-m", module, *command, *map(str, args)], cwd=REPO,
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args, **kw):
    p = _start(args, **kw)
    out, err = p.communicate(timeout=WAIT)
    return p.returncode, out, err


def _main(args):
    """The same command line in this process, with 1 torch thread (as the subprocesses)."""
    from sphereface_plus.cli import main

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(old)


def _lines(path: Path) -> int:
    try:
        return len([ln for ln in path.read_text().splitlines() if ln.strip()])
    except OSError:
        return 0


def _wait_for(cond, procs, what):
    deadline = time.monotonic() + WAIT
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process ended (rc {p.returncode}) before {what}: {p.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {WAIT} s")
        time.sleep(0.01)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_state(a, b):
    assert a["iteration"] == b["iteration"]
    for part in ("model", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def _one_error(rc, err, status, *fragments):
    assert rc == status, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _snapshot(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted N_REF-iteration run with a checkpoint every 2 iterations (all kept)."""
    out = tmp_path_factory.mktemp("reference")
    assert _main(["train", "--config", SMOKE, *_overrides(out, cache, N_REF, every=2)]) == 0
    return out


# ------------------------------------------------------------------------------------ the run folder
def test_a_second_run_into_a_folder_is_refused_and_leaves_it_byte_identical(reference, cache):
    before = _snapshot(reference)
    rc, _, err = _run(["--config", SMOKE, *_overrides(reference, cache, 3)])
    _one_error(rc, err, 2, "already holds a run", "--resume auto", "another folder")
    assert _snapshot(reference) == before


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_at_a_random_step_saves_it_and_resume_is_bit_identical(signame, reference, cache, tmp_path):
    """SIGTERM / SIGINT / SIGUSR1 at a random step: that step's checkpoint, exit 143 / 130 / 0, a line saying
    how to resume; --resume auto then ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    k = random.Random().randint(1, 4)
    proc = _start(["--config", SMOKE, *_overrides(out, cache, 1000)])
    try:
        _wait_for(lambda: _lines(out / "metrics.jsonl") >= k, [proc], f"{k} logged steps")
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT[signame], err[-3000:]
    assert "Traceback" not in err
    state = _load(out / "checkpoints" / "last.pt")
    j = state["iteration"]
    assert k <= j < N_REF, (k, j)  # signalled at step k: this or the next step was saved, no later
    assert f"stopped by {signame} at iteration {j}" in err and "--resume auto" in err, err[-2000:]
    assert _lines(out / "metrics.jsonl") == j
    assert _main(["train", "--config", SMOKE, *_overrides(out, cache, N_REF), "--resume", "auto"]) == 0
    _same_state(_load(out / "checkpoints" / "last.pt"), _load(reference / "checkpoints" / "last.pt"))


def test_two_concurrent_runs_one_runs_one_is_refused(cache, tmp_path):
    out = tmp_path / "run"
    proc = _start(["--config", SMOKE, *_overrides(out, cache, 1000)])
    try:
        _wait_for(lambda: _lines(out / "metrics.jsonl") >= 1, [proc], "a logged step")
        rc, _, err = _run(["--config", SMOKE, *_overrides(out, cache, 1000), "--resume", "auto"])
        _one_error(rc, err, 2, "in use by another run", f"process {proc.pid}")
        assert proc.poll() is None  # the first run goes on
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped by SIGUSR1" in err, err[-3000:]


def _launch_two(args, port, env_extra=None):
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "sphereface_plus", "train", *map(str, args)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs):
    out = []
    for p in procs:
        try:
            out.append(p.communicate(timeout=WAIT)[1])
        finally:
            if p.poll() is None:
                p.kill()
    return out


def test_two_gloo_processes_one_signalled_both_save_and_resume_bit_identically(cache, tmp_path):
    """2 processes, SIGTERM to rank 1 only at a random step: both ranks save the same step and exit 143; the
    resumed pair ends bit-identical to an uninterrupted pair."""
    n = 6
    ref, run = tmp_path / "ref", tmp_path / "run"
    procs = _launch_two(["--config", SMOKE, *_overrides(ref, cache, n)], _free_port())
    errs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]

    k = random.Random().randint(1, 3)
    procs = _launch_two(["--config", SMOKE, *_overrides(run, cache, 1000)], _free_port())
    try:
        _wait_for(lambda: _lines(run / "metrics.jsonl") >= k, procs, f"{k} logged steps")
        procs[1].send_signal(signal.SIGTERM)
    finally:
        errs = _finish(procs)
    assert [p.returncode for p in procs] == [143, 143], errs[0][-3000:] + errs[1][-3000:]
    j = _load(run / "checkpoints" / "last.pt")["iteration"]
    assert k <= j < n and f"stopped by SIGTERM at iteration {j}" in errs[0], errs[0][-2000:]

    procs = _launch_two(["--config", SMOKE, *_overrides(run, cache, n), "--resume", "auto"], _free_port())
    errs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _same_state(_load(run / "checkpoints" / "last.pt"), _load(ref / "checkpoints" / "last.pt"))


def test_a_silent_peer_fails_in_bounded_time_naming_its_rank(cache, tmp_path):
    """train.dist_timeout: rank 1 stopped (SIGSTOP) -> rank 0 exits 1 with one line naming rank 1."""
    out = tmp_path / "run"
    procs = _launch_two(["--config", SMOKE, *_overrides(out, cache, 1000, extra=["train.dist_timeout=5"])],
                        _free_port())
    try:
        _wait_for(lambda: _lines(out / "metrics.jsonl") >= 2, procs, "2 logged steps")
        procs[1].send_signal(signal.SIGSTOP)
        _, err = procs[0].communicate(timeout=WAIT)
    finally:
        procs[1].kill()
        _finish(procs)
    _one_error(procs[0].returncode, err, 1, "rank 1", "stopped answering", "train.dist_timeout=5")


# ------------------------------------------------------------------------------------ integrity
def _flip_tensor_byte(path: Path, member_suffix: str = "/data/0") -> None:
    """Flip one byte in the middle of a tensor's data record (the file still unpickles)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # the local header: 30 bytes + name + extra, then the data
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_is_refused_and_resume_auto_falls_back(reference, cache, tmp_path):
    run = tmp_path / "run"
    assert _main(["train", "--config", SMOKE, *_overrides(run, cache, 6, every=2)]) == 0
    folder = run / "checkpoints"
    good4 = _load(folder / "ckpt_0000004.pt")
    for name in ("last.pt", "ckpt_0000006.pt"):
        _flip_tensor_byte(folder / name)
        _load(folder / name)  # a plain torch.load does not notice
    rc, _, err = _run(["--config", SMOKE, *_overrides(run, cache, 6), "--resume", folder / "last.pt"])
    _one_error(rc, err, 2, "last.pt", "failed its checksum")
    rc, text, _ = _run([run], command=("check",))
    assert rc == 1 and "last.pt" in text and "ckpt_0000006.pt" in text and "failed its checksum" in text, text
    # --resume auto: the damaged files are skipped, the newest good one (4) continues to 6
    assert _main(["train", "--config", SMOKE, *_overrides(run, cache, 6), "--resume", "auto"]) == 0
    _same_state(_load(folder / "last.pt"), _load(reference / "checkpoints" / "ckpt_0000006.pt"))
    assert good4["iteration"] == 4


def test_check_command_names_damaged_checkpoints_and_pack_chunks(tmp_path, capsys):
    from data_prep.packed import CHUNK_ITEMS, PackedReader, PackWriter
    from sphereface_plus.cli import main
    from sphereface_plus.engine.checkpoint import save_checkpoint
    from sphereface_plus.errors import InputFileError

    n = CHUNK_ITEMS + 20
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (n, 4, 3, 3), dtype=np.uint8)
    pack = tmp_path / "pack"
    with PackWriter(pack, n, 4, 3) as w:
        for c in crops:
            w.add(c)
        w.finish([f"{i}.jpg" for i in range(n)], [i % 2 for i in range(n)], ["a", "b"], "112x96")
    index = json.loads((pack / "packed.json").read_text())
    # an independent reference for the stored digests: hashlib over the raw bytes of each run of crops
    import hashlib

    want = [hashlib.sha256(crops[i:i + CHUNK_ITEMS].tobytes()).hexdigest() for i in range(0, n, CHUNK_ITEMS)]
    assert index["checksum"]["chunks"] == want
    save_checkpoint({"iteration": 3, "w": torch.arange(1000.0)}, tmp_path / "run")
    capsys.readouterr()
    assert main(["check", str(pack), str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.count("ok ") == 2

    data = pack / "packed.npy"
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0x01  # a pixel of the last chunk
    data.write_bytes(bytes(raw))
    reader = PackedReader(pack)
    assert np.array_equal(reader[0][0], crops[0])  # the first chunk is intact
    with pytest.raises(InputFileError, match=rf"crops {CHUNK_ITEMS}\.\.{n - 1} \(chunk 1\) fail their checksum"):
        reader[n - 1]
    _flip_tensor_byte(tmp_path / "run" / "checkpoints" / "last.pt")
    assert main(["check", str(pack), str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "packed.npy" in out and "last.pt" in out and "failed its checksum" in out

    # a pack written before checksums existed is still read, with a warning
    del index["checksum"]
    (pack / "packed.json").write_text(json.dumps(index))
    assert PackedReader(pack)[n - 1][1] == (n - 1) % 2


# ------------------------------------------------------------------------------------ the NaN guard
def test_the_nan_recipe_never_leaves_an_insane_checkpoint(cache, tmp_path):
    """optim.lr=5 optim.warmup_iters=40: weights reach ~1e17 with a finite loss before the first NaN. No
    checkpoint may hold them; giving up is one error line, exit 1, naming what to try."""
    from sphereface_plus.face.trainer import HEALTHY_BOUND

    out = tmp_path / "nan"
    rc, _, err = _run(["--config", SMOKE, *_overrides(out, cache, 30, every=3, extra=[
        "optim.lr=5", "optim.warmup_iters=40", "train.nan_patience=2", "train.max_rollbacks=2"])])
    if rc != 0:
        _one_error(rc, err, 1, "diverged", "optim.lr", "optim.warmup_iters")
    files = sorted((out / "checkpoints").glob("*.pt"))
    assert files, err[-2000:]
    for f in files:
        s = _load(f)
        values = [v for v in s["model"].values() if v.is_floating_point()] + [s["head"]["weight"]] + \
            [st["momentum_buffer"] for st in s["optimizer"]["state"].values()]
        worst = max(float(v.abs().max()) for v in values)
        assert worst <= HEALTHY_BOUND and np.isfinite(worst), (f.name, worst)


# ------------------------------------------------------------------------------------ the environment
def test_output_locations_are_checked_before_training(reference, cache, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = _run(["--config", SMOKE, *_overrides(afile, cache, 1)])
    _one_error(rc, err, 2, "is a file, not a folder")
    out = tmp_path / "run"
    (out).mkdir()
    (out / "checkpoints").write_text("in the way")
    rc, _, err = _run(["--config", SMOKE, *_overrides(out, cache, 1)])
    _one_error(rc, err, 2, "checkpoints", "is a file, not a folder")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing trained or written


def test_bad_resume_file_is_refused_before_anything_is_written(cache, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "run"
    rc, _, err = _run(["--config", SMOKE, *_overrides(out, cache, 1), "--resume", garbage])
    _one_error(rc, err, 2, "garbage.pt", "not a valid checkpoint")
    assert not out.exists()


def test_stale_lock_and_temp_files_of_a_dead_run_are_named_and_removed(reference, cache, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "x"}))
    tmp = run / "checkpoints" / ".last.pt.abc123.tmp"
    tmp.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert _main(["train", "--config", SMOKE, *_overrides(run, cache, N_REF), "--resume", "auto"]) == 0
    assert f"process {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert not tmp.exists() and "temporary file" in caplog.text
    assert (run / ".run.lock").read_text() == ""  # released


def test_an_elastic_restart_resumes_by_itself(reference, cache, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "checkpoints" / "last.pt").unlink()
    for p in (run / "checkpoints").glob("ckpt_*.pt"):
        if int(p.stem.split("_")[1]) > 4:
            p.unlink()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # a job that did not start this run (refused at its first attempt, say) is not restarted into it
    assert _main(["train", "--config", SMOKE, *_overrides(run, cache, N_REF)]) == 2
    (run / ".run.elastic").write_text("job-a")  # what the first attempt of the owning job recorded
    assert _main(["train", "--config", SMOKE, *_overrides(run, cache, N_REF)]) == 0  # no --resume given
    _same_state(_load(run / "checkpoints" / "last.pt"), _load(reference / "checkpoints" / "last.pt"))


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(reference, cache, tmp_path):
    size = (reference / "checkpoints" / "last.pt").stat().st_size
    mnt = tmp_path / "small"
    # last.pt + ckpt_1 fit, the third file does not
    if not _mount_tmpfs(mnt, f"size={int(size * 2.5)}"):
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        out = mnt / "run"
        rc, _, err = _run(["--config", SMOKE, *_overrides(out, cache, 5, every=1)])
        _one_error(rc, err, 1, "No space left on device")
        state = _load(out / "checkpoints" / "last.pt")  # intact
        assert state["iteration"] >= 1
        assert not list((out / "checkpoints").glob(".*.tmp"))
    finally:
        _umount(mnt)


def test_a_read_only_out_dir_is_one_line_before_training(cache, tmp_path):
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        rc, _, err = _run(["--config", SMOKE, *_overrides(mnt / "run", cache, 1)])
        _one_error(rc, err, 1, "read-only")
    finally:
        _umount(mnt)


def test_a_non_utf8_byte_in_a_pairs_or_list_file_is_one_line_naming_file_and_line(tmp_path):
    from data_prep.datasets import ListDataset
    from sphereface_plus.errors import InputFileError

    feats = tmp_path / "f.npz"
    np.savez(feats, paths=np.array(["a/1.jpg", "a/2.jpg", "b/1.jpg"]), features=np.eye(3, dtype=np.float32))
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes(b"a/1.jpg a/2.jpg 1\na/1.jpg b/1.jpg 0\nb/1.jpg caf\xe9.jpg 0\n")
    rc, _, err = _run(["pairs", "--features", feats, "--pairs", pairs, "--folds", "2"], command=("verify",))
    _one_error(rc, err, 2, "pairs.txt", "line 3", "0xe9", "UTF-8")
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"a/1.jpg 0\n\xff/2.jpg 1\n")
    with pytest.raises(InputFileError, match=r"list\.txt, line 2: byte 0xff"):
        ListDataset(tmp_path, lst)


def test_a_second_signal_exits_at_once():
    """The first SIGTERM only sets the flag (the loop saves and stops); a second one exits with 143 at once."""
    code = ("import os, signal, time\n"
            "from sphereface_plus.engine.preempt import Preemption\n"
            "with Preemption() as p:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    deadline = time.monotonic() + 60\n"
            "    while p.requested() is None and time.monotonic() < deadline:\n"
            "        time.sleep(0.01)\n"
            "    print('flag', p.requested(), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(60)\n"
            "    print('still running', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=WAIT)
    assert res.stdout.split() == ["flag", "SIGTERM"], res.stdout + res.stderr
    assert res.returncode == 143 and "second signal" in res.stderr, (res.returncode, res.stderr)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_torchrun_worker_exits_with_its_status_and_its_output_flushed(world_size):
    """``exit_process``: a torchrun worker (WORLD_SIZE > 1) ends by ``os._exit`` (no interpreter teardown of
    the distributed library's C++ objects) after flushing what it printed and logged; a plain process by
    ``sys.exit``. Either way the status and the buffered output arrive."""
    code = ("import atexit, logging, sys\n"
            "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
            "atexit.register(lambda: print('teardown', file=sys.stderr))\n"
            "from sphereface_plus.cli import exit_process\n"
            "print('written', end='')\n"
            "logging.getLogger('t').info('logged')\n"
            "exit_process(3)\n"
            "print('never')\n")
    env = dict(os.environ, WORLD_SIZE=world_size, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3
    assert res.stdout == "written" and "logged" in res.stderr
    assert ("teardown" in res.stderr) == (world_size == "1")  # a worker skips the interpreter's teardown
