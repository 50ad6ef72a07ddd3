"""`clean` under hostile input and killed runs (issue 9): archives and paths refused with one line before any work,
bounded memory on a zip bomb, pool workers that die with a SIGKILLed parent, temp folders of killed runs removed by the
next run (the shared `storage.atomic_path`, so `convert` gets it too), Ctrl-C as before, an empty .txt corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from textmill.pipelines.clean import main as clean_main
from textmill import storage
from textmill.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TEXT = "A paragraph of ordinary English prose, long enough to pass the length filter of the cleaner."


def run_clean(*argv, **kw):
    return subprocess.run(["textmill", "clean", *map(str, argv)], capture_output=True, text=True, cwd=REPO, **kw)


def refused(*argv) -> str:
    """The UserError `textmill clean ARGV` stops with (the CLI prints it as one line, exit 2: tests/test_readers.py)."""
    with pytest.raises(UserError) as e:
        clean_main(list(map(str, argv)))
    assert "\n" not in str(e.value)
    return str(e.value)


def assert_one_line(err, *needles):
    for needle in needles:
        assert needle in err, err


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*.tmp"))


def _patch_zip(path: Path, flag: int | None = None, method: int | None = None) -> None:
    """Set the general-purpose flag bits / compression method of every member in both headers (what zipfile cannot
    write: an encrypted member, a Deflate64 member)."""
    data = bytearray(path.read_bytes())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(sig)
        while at >= 0:
            if flag is not None:
                data[at + flag_at:at + flag_at + 2] = (int.from_bytes(data[at + flag_at:at + flag_at + 2], "little") | flag).to_bytes(2, "little")
            if method is not None:
                data[at + method_at:at + method_at + 2] = method.to_bytes(2, "little")
            at = data.find(sig, at + 4)
    path.write_bytes(bytes(data))


def test_bad_archive_members_and_paths_are_one_line_before_any_work(tmp_path):
    good = "\n\n".join(f"{TEXT} Number {i}." for i in range(5))
    cases = []
    for name, kw in [("encrypted.zip", {"flag": 0x1}), ("deflate64.zip", {"method": 9})]:
        with zipfile.ZipFile(tmp_path / name, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("a.txt", good)
        _patch_zip(tmp_path / name, **kw)
        cases.append((tmp_path / name, [f"{name}:a.txt", "encrypted" if "flag" in kw else "compression method 9"]))
    with zipfile.ZipFile(tmp_path / "corrupt.zip", "w", zipfile.ZIP_DEFLATED) as zf:  # compressed bytes damaged
        zf.writestr("a.txt", good * 50)
    data = bytearray((tmp_path / "corrupt.zip").read_bytes())
    data[60:70] = b"\xff" * 10
    (tmp_path / "corrupt.zip").write_bytes(bytes(data))
    cases.append((tmp_path / "corrupt.zip", ["corrupt.zip:a.txt", "corrupt archive member", "re-download"]))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases.append((loop, [str(loop), "point --raw at the real file"]))
    for raw, needles in cases:
        out = tmp_path / "out"
        assert_one_line(refused("--raw", raw, "--out", out, "--split", "paragraph"), *needles)
        assert nothing_written(out), raw
    (tmp_path / "ok.txt").write_text(good, encoding="utf-8")
    (tmp_path / "taken").write_text("an existing file", encoding="utf-8")
    assert_one_line(refused("--raw", tmp_path / "ok.txt", "--out", tmp_path / "taken"), "taken is an existing file",
                    "choose a new or empty folder")
    assert (tmp_path / "taken").read_text(encoding="utf-8") == "an existing file"


def test_empty_txt_corpus_fails_like_empty_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("text\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    for name in ("empty.csv", "empty.txt"):
        out = tmp_path / f"out-{name}"
        assert_one_line(refused("--raw", tmp_path / name, "--out", out, "--set", "clean.workers=1"), "no records", name)
        assert nothing_written(out)


def test_zip_bomb_is_read_in_bounded_memory(tmp_path):
    """A 1 MB zip holding one 192 MB line: held whole it would add >= 192 MB to a ~220 MB process."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf, zf.open("big.txt", "w") as f:
        block = b"letters " * (1 << 17)
        for _ in range(192):
            f.write(block)
    assert bomb.stat().st_size < 2_000_000
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(p.stderr, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe, "textmill", "clean", "--raw", str(bomb), "--out",
                           str(tmp_path / "out"), "--set", "clean.workers=1"], capture_output=True, text=True, cwd=REPO)
    rc, peak_kb = map(int, proc.stdout.split())
    assert rc == 0, proc.stderr
    report = json.loads((tmp_path / "out/report.json").read_text(encoding="utf-8"))
    assert report["drops"] == {"too_long": 1}
    assert peak_kb < 330_000, f"peak RSS {peak_kb / 1024:.0f} MiB"


# --- killed runs ---------------------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def _start_big_clean(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A clean that is still running when the test signals it: 160,000 documents take ~10 s on 2 cores, and the
    test acts within ~1 s of the workers starting (40,000 once finished before a SIGINT landed in CI: rc 0)."""
    raw = tmp_path / "raw.jsonl"
    with raw.open("w", encoding="utf-8") as f:
        for i in range(160_000):
            f.write(json.dumps({"text": f"{TEXT} Variation {i} with words {i * 7} and {i * 13}."}) + "\n")
    out = tmp_path / "out"
    # SIGINT back to its default in the child: a runner started as a background job (`cmd &` without job control)
    # ignores it, the child would inherit that, and Python never installs its KeyboardInterrupt handler then
    proc = subprocess.Popen(["textmill", "clean", "--raw", str(raw), "--out", str(out), "--set", "clean.workers=2",
                             "--set", "clean.chunk_size=64"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait(lambda: len(_children(proc.pid)) >= 2 and list(tmp_path.glob(".out.*.tmp")), 60), "no workers started"
    return proc, out


def test_sigkill_leaves_no_workers_and_the_next_run_removes_the_temp_folder(tmp_path):
    proc, out = _start_big_clean(tmp_path)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait(lambda: not any(_alive(w) for w in workers), 10), "pool workers outlived the killed parent"
    stale = list(tmp_path.glob(".out.*.tmp"))
    assert len(stale) == 1 and (stale[0] / storage.OWNER_FILE).is_file()
    (tmp_path / "small.txt").write_text(TEXT, encoding="utf-8")
    assert run_clean("--raw", tmp_path / "small.txt", "--out", out).returncode == 0
    assert not list(tmp_path.glob(".out.*.tmp")) and (out / "docs.jsonl").is_file()


def test_ctrl_c_still_stops_cleanly(tmp_path):
    proc, out = _start_big_clean(tmp_path)
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the foreground process group
    assert proc.wait(timeout=30) != 0
    assert _wait(lambda: not any(_alive(w) for w in workers), 10)
    assert nothing_written(out)


def test_atomic_path_removes_only_temp_folders_of_dead_owners(tmp_path):
    dest = tmp_path / "export"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owners = {"dead": {"pid": dead.pid, "boot_id": storage._boot_id(), "start": "1"},
              "rebooted": {"pid": os.getpid(), "boot_id": "another-boot", "start": storage._start_time(os.getpid())},
              "pid-reused": {"pid": os.getpid(), "boot_id": storage._boot_id(), "start": "12345"},
              "live": storage._owner()}
    for name, owner in owners.items():
        folder = tmp_path / f".export.{name}.tmp"
        (folder / "export").mkdir(parents=True)
        (folder / storage.OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    (tmp_path / ".export.legacy.tmp").mkdir()          # no owner record: not ours to judge
    (tmp_path / ".exports.x.tmp").mkdir()              # another destination's
    with storage.atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("x", encoding="utf-8")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".export.legacy.tmp", ".export.live.tmp", ".exports.x.tmp", "export"]


def test_valid_json_python_cannot_parse_natively_is_a_record_problem_not_a_traceback(tmp_path):
    """Valid JSON beyond what Python's json/int take by default (a 5,000-digit integer: ValueError past 4,300 digits;
    nesting 100,000 deep: RecursionError) in a .jsonl and a .json: the long integer is kept exactly (here as the id), a
    deeply nested line is `malformed_json`, a deeply nested array element is one line naming it."""
    big = "9" * 5000
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text(f'{{"id": {big}, "text": "{TEXT}"}}\n'
                     f'{{"id": 2, "text": "{TEXT} Again.", "deep": {"[" * 100_000}{"]" * 100_000}}}\n'
                     f'{{"id": 3, "text": "{TEXT} Three times over, with more words."}}\n')
    out = tmp_path / "out"
    result = run_clean("--raw", jsonl, "--out", out, "--id", "id", "--set", "clean.workers=1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    docs = [json.loads(line) for line in (out / "docs.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == [big, "3"]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["malformed_json"]

    array = tmp_path / "deep.json"
    array.write_text(f'[{{"id": {big}, "text": "{TEXT}"}}, {"[" * 100_000}{"]" * 100_000}]')
    err = refused("--raw", array, "--out", tmp_path / "out2")
    assert_one_line(err, "deep.json", "element 2", "nested too deep")


def test_a_device_or_fifo_given_as_raw_is_named_for_what_it_is(tmp_path):
    """`--raw /dev/zero` or a FIFO was refused as "no such file or folder", which sends the user looking for a typo."""
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for raw in ("/dev/zero", fifo):
        err = refused("--raw", raw, "--out", tmp_path / "out")
        assert_one_line(err, str(raw), "not a regular file or folder")
    assert nothing_written(tmp_path / "out")


def test_out_holding_a_corpus_and_other_files_is_not_replaced(tmp_path):
    """`--out .` in a project folder that happens to hold a docs.jsonl: the folder was replaced whole, deleting every
    other file and folder in it. Refused in one line naming them; a folder holding only a previous clean is replaced."""
    raw = tmp_path / "raw.txt"
    raw.write_text(TEXT + "\n")
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    (project / "docs.jsonl").write_text('{"id": "mine", "text": "mine"}\n')
    (project / "thesis.tex").write_text("precious")
    err = refused("--raw", raw, "--out", project)
    assert_one_line(err, str(project), "'notes'", "'thesis.tex'")
    assert (project / "thesis.tex").read_text() == "precious" and (project / "notes").is_dir()

    previous = tmp_path / "previous"
    result = run_clean("--raw", raw, "--out", previous, "--set", "clean.workers=1")
    assert result.returncode == 0, result.stderr
    result = run_clean("--raw", raw, "--out", previous, "--set", "clean.workers=1")  # a re-run replaces its own output
    assert result.returncode == 0, result.stderr


def test_a_huge_worker_count_is_capped_not_forked(tmp_path):
    """`clean.workers=100000` (a typo) made the pool fork every worker up front until the machine stalled. The count is
    capped at OVERSUBSCRIBE per usable CPU, with a warning; a negative count is refused by the config."""
    from textmill.pipelines.clean import OVERSUBSCRIBE

    cap = OVERSUBSCRIBE * len(os.sched_getaffinity(0))
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": f"{TEXT} Variation {i}, words {i * 7}."}) + "\n" for i in range(3000)))
    proc = subprocess.Popen(["textmill", "clean", "--raw", str(raw), "--out", str(tmp_path / "out"), "--set",
                             f"clean.workers={cap + 8}", "--set", "clean.chunk_size=16"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    most = 0
    while proc.poll() is None:
        most = max(most, len(_children(proc.pid)))
        time.sleep(0.02)
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert most <= cap + 1, f"{most} child processes for a cap of {cap}"   # + the pool's resource tracker
    assert f"clean.workers={cap + 8} is more than {OVERSUBSCRIBE} per CPU" in stderr, stderr
    assert_one_line(refused("--raw", raw, "--out", tmp_path / "out2", "--set", "clean.workers=-1"),
                    "clean.workers=-1 must be >= 0")


@pytest.mark.parametrize("bounds", [("--max-chars", "0"), ("--max-chars", "-1"), ("--min-chars", "500", "--max-chars", "10")])
def test_length_bounds_that_drop_everything_are_refused(tmp_path, bounds):
    """Ad hoc `--max-chars 0` or min above max ran to the end and dropped every document as too_long (the configured
    corpora already refused min > max)."""
    raw = tmp_path / "raw.txt"
    raw.write_text(TEXT + "\n")
    err = refused("--raw", raw, "--out", tmp_path / "out", *bounds)
    assert_one_line(err, "--min-chars=", "--max-chars=", "need min <= max and max >= 1")
    assert nothing_written(tmp_path / "out")
