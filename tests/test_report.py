"""``implreg report``: claims declared by the presets, verdicts, and the page it writes.

The report runs presets at their ``tiny`` budget here (the hidden budget of the
tests); the HTML is read back with :class:`html.parser.HTMLParser`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from implreg.cli import main
from implreg.experiments import PRESETS
from implreg.experiments.base import Claim
from implreg.report import FAIL, NOT_RUN, PASS, VERDICTS, build_report, evaluate_claim

QUICK = ["tf-dynamics", "mf-det-sign", "locality-pathfinder", "tensor-rank-complexity"]


class Page(HTMLParser):
    """Tables (by class) as rows of cell texts, image sources, and any script or link."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.scripts = 0
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("class", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])
        elif tag in ("script", "link", "iframe"):
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _rows(table: list[list[str]]) -> list[dict[str, str]]:
    heads, *rows = table
    return [dict(zip(heads, r)) for r in rows]


def _md_claims(text: str) -> list[tuple[str, str, str]]:
    section = text.split("## Published vs measured", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")][2:]  # no header, rule
    out = []
    for ln in lines:
        cells = [c.strip().replace("\\|", "|") for c in ln.strip("|").split(" | ")]
        out.append((cells[0], cells[1], cells[9]))
    return out


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("IMPLREG_DATA_DIR", raising=False)
        report = build_report(
            out, "tiny", presets=QUICK, checks=["lemma1-cp"], threads=1, log=lambda *_: None
        )
    return report


def test_every_preset_declares_claims():
    for name, preset in PRESETS.items():
        assert preset.claims, f"{name} declares no claim"
        for c in preset.claims:
            assert c.statement and c.source and c.name
        if preset.reduced is None:
            assert preset.reduced_note, f"{name} skips the reduced budget without saying why"
        names = [(c.name, c.budget) for c in preset.claims]
        assert len(set(names)) == len(names), f"{name} declares a claim twice"


def test_a_violated_claim_fails_and_a_kept_one_passes():
    claims = {c.name: c for c in PRESETS["tf-dynamics"].claims}
    fake = {
        "runs": [
            {"init_std": 0.05, "n_learned": 6, "final_reconstruction_error": 0.08},
            {"init_std": 0.005, "n_learned": 4, "final_reconstruction_error": 0.5},
        ]
    }
    rows = {n: evaluate_claim("tf-dynamics", c, fake, "full") for n, c in claims.items()}
    assert rows["components learned"].verdict == FAIL
    assert rows["components learned"].measured == 4
    assert rows["reconstruction error"].verdict == FAIL
    assert rows["smaller init, lower error"].verdict == FAIL  # 0.08 / 0.5 < 1
    fake["runs"][1] |= {"n_learned": 5, "final_reconstruction_error": 0.004}
    rows = {n: evaluate_claim("tf-dynamics", c, fake, "full") for n, c in claims.items()}
    assert {r.verdict for r in rows.values()} == {PASS}
    # a summary without the measured key: FAIL with a reason, never a crash
    row = evaluate_claim("tf-dynamics", claims["components learned"], {"runs": []}, "full")
    assert row.verdict == FAIL and math.isnan(row.measured) and "cannot be measured" in row.reason


@pytest.mark.parametrize(
    ("compare", "published", "tolerance", "good", "bad"),
    [
        ("at_most", 0.005, 0.005, 0.01, 0.0101),
        ("at_most", None, 1.0, 0.99, 1.01),
        ("at_least", 8.0, 4.0, 4.0, 3.9),
        ("at_least", None, 0.01, 0.02, 0.005),
        ("within_abs", 50.5, 5.0, 45.6, 44.0),
        ("within_rel", 70.7, 0.02, 71.9, 72.2),
        ("equals", 5.0, 0.0, 5.0, 6.0),
    ],
)
def test_compare_semantics(compare, published, tolerance, good, bad):
    c = Claim("x", "s", "src", published, "value", compare, tolerance)
    assert c.holds(c.value({"value": good}))
    assert not c.holds(c.value({"value": bad}))
    assert not c.holds(float("nan"))


def test_claim_declarations_are_checked():
    with pytest.raises(ValueError):
        Claim("x", "s", "src", 1.0, "v", "roughly", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Claim("x", "s", "src", None, "v", "within_rel", 0.1)
    c = Claim("x", "s", "src", 1.0, "v", "equals", 0.0, "full")
    row = evaluate_claim("p", c, {"v": 1.0}, "reduced")
    assert row.verdict == NOT_RUN and "not run at this budget" in row.reason


def test_html_page(tiny_report):
    out = tiny_report.out_dir
    page = _parse(out / "report.html")
    assert page.scripts == 0
    assert "http://" not in (out / "report.html").read_text()
    assert page.images, "no figure on the page"
    for src in page.images:
        assert not Path(src).is_absolute()
        assert (out / src).is_file(), src
    claims = _rows(page.tables["claims"])
    expected = sum(len(PRESETS[n].claims) for n in QUICK)
    assert len(claims) == expected
    for row in claims:
        assert row["verdict"] in VERDICTS, row
        if row["verdict"] != NOT_RUN:
            assert row["measured"] not in ("", "-"), row
        else:
            assert row["note"], row
    data = [r for r in claims if r["preset"] == "tensor-rank-complexity"]
    assert data and all(r["verdict"] == NOT_RUN for r in data)
    assert all("--data-dir" in r["note"] for r in data if r["budget"] == "both")
    assert all("at this budget" in r["note"] for r in data if r["budget"] == "full")
    ran = [r for r in claims if r["preset"] == "tf-dynamics"]
    assert all(r["verdict"] in (PASS, FAIL) for r in ran)
    checks = _rows(page.tables["checks"])
    assert [r["check"] for r in checks] == ["lemma1-cp"]
    assert checks[0]["verdict"] in (PASS, FAIL)
    times = {r["part"]: float(r["seconds"]) for r in _rows(page.tables["times"])}
    for part in ("run tf-dynamics", "run mf-det-sign", "theorem checks", "total"):
        assert part in times
    assert times["run tf-dynamics"] > 0


def test_markdown_twin_has_the_same_claim_rows(tiny_report):
    out = tiny_report.out_dir
    page = _parse(out / "report.html")
    html_rows = [(r["preset"], r["claim"], r["verdict"]) for r in _rows(page.tables["claims"])]
    assert _md_claims((out / "report.md").read_text()) == html_rows
    saved = json.loads((out / "report.json").read_text())
    assert saved["counts"] == tiny_report.counts()
    assert sum(saved["counts"].values()) == len(html_rows)


def test_a_report_reuses_finished_runs_and_keeps_other_configs(tiny_report, monkeypatch):
    out = tiny_report.out_dir
    again = build_report(out, "tiny", presets=["tf-dynamics"], checks=["lemma1-cp"], log=str)
    assert again.presets[0].reused
    assert [c.verdict for c in again.claims] == [
        c.verdict for c in tiny_report.claims if c.preset == "tf-dynamics"
    ]
    # another configuration in the same folder: the old run is set aside, never deleted
    preset = PRESETS["tf-dynamics"]
    other = dataclasses.replace(preset, tiny={**preset.tiny, "max_iterations": 200})
    monkeypatch.setitem(PRESETS, "tf-dynamics", other)
    third = build_report(out, "tiny", presets=["tf-dynamics"], checks=["lemma1-cp"], log=str)
    assert not third.presets[0].reused
    assert list((out / "runs").glob("tf-dynamics.replaced-*"))


def test_a_failing_preset_is_a_row_not_a_crash(tmp_path, monkeypatch):
    import implreg.api
    from implreg.api import RunError

    def broken(*args, **kwargs):
        raise RunError("cannot write x: no space left on the device")

    monkeypatch.setattr(implreg.api, "run_preset", broken)
    report = build_report(tmp_path, "tiny", presets=["mf-det-sign"], checks=["lemma1-cp"], log=str)
    row = report.presets[0]
    assert row.status == "failed" and "no space left" in row.note
    assert all(c.verdict == NOT_RUN and "failed" in c.reason for c in row.claims)
    assert (tmp_path / "report.html").is_file()


def test_seed_statistics(tmp_path):
    report = build_report(
        tmp_path,
        "tiny",
        presets=["mf-det-sign"],
        seeds=[0, 1],
        checks=["lemma1-cp"],
        threads=1,
        log=str,
    )
    rows = [c for c in report.claims if c.verdict != NOT_RUN]
    measured = [c for c in rows if c.seeds and c.seeds["n"]]
    assert measured, "no claim has seed statistics"
    for c in measured:
        assert c.seeds["q25"] <= c.seeds["median"] <= c.seeds["q75"]
        assert len(c.seeds["values"]) == 2
    page = _parse(tmp_path / "report.html")
    assert any("median" in r["over seeds"] for r in _rows(page.tables["claims"]))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["report", "--budget", "huge"], "--budget"),
        (["report", "--budget", "reduced", "--only", "tf-dynamics,nope"], "unknown preset"),
        (["report", "--budget", "reduced", "--seeds", "2-1"], "backwards"),
        (["report", "--budget", "reduced", "--backend", "carrier-pigeon"], "backend"),
        (["report", "--budget", "reduced", "--jobs", "0"], "--jobs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["report", "--budget", "reduced", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_configuration_run_twice_is_copied_not_recomputed(tmp_path, monkeypatch):
    # the trio's HTF panel with htf-dynamics' own (tiny) configuration: the report runs it
    # once, in the trio, and htf-dynamics copies that finished run
    from implreg.report import _as_strings

    trio = PRESETS["dynamics-mf-tf-htf"]
    same = ";".join(_as_strings(PRESETS["htf-dynamics"].tiny))
    monkeypatch.setitem(
        PRESETS, "dynamics-mf-tf-htf", dataclasses.replace(trio, tiny={**trio.tiny, "htf": same})
    )
    lines: list[str] = []
    stale = tmp_path / "runs" / ".htf-dynamics.copying"  # a copy cut short by a kill -9
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{half")
    report = build_report(
        tmp_path,
        "tiny",
        presets=["dynamics-mf-tf-htf", "htf-dynamics"],
        checks=["lemma1-cp"],
        threads=1,
        log=lines.append,
    )
    trio_row, htf_row = report.presets
    assert not trio_row.reused and htf_row.reused and "copied" in htf_row.note
    panel = tmp_path / "runs" / "dynamics-mf-tf-htf" / "htf"
    copy = tmp_path / "runs" / "htf-dynamics"
    saved = json.loads((copy / "config.json").read_text())
    assert saved["preset"] == "htf-dynamics" and saved["copied_from"] == str(panel)
    assert saved["config"] == json.loads((panel / "config.json").read_text())["config"]
    assert (copy / "summary.json").read_bytes() == (panel / "summary.json").read_bytes()
    assert not list(copy.glob(".lock")) and not list(copy.parent.glob(".*copying"))
    assert any("copying the finished run" in line for line in lines)
    rows = [c for c in report.claims if c.preset == "htf-dynamics"]
    assert rows and all("did not run" not in c.reason and "failed" not in c.reason for c in rows)
    # a different configuration is never taken for the same one
    other = dataclasses.replace(
        PRESETS["htf-dynamics"], tiny={**PRESETS["htf-dynamics"].tiny, "max_iterations": 200}
    )
    monkeypatch.setitem(PRESETS, "htf-dynamics", other)
    again = build_report(tmp_path, "tiny", presets=["htf-dynamics"], checks=["lemma1-cp"], log=str)
    assert not again.presets[0].reused


def _measured(report) -> list[tuple[str, str, str, str]]:
    return [(c.preset, c.name, c.verdict, repr(c.measured)) for c in report.claims]  # nan == nan


def test_jobs_run_presets_side_by_side_with_the_serial_numbers(tiny_report, tmp_path):
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("IMPLREG_DATA_DIR", raising=False)
        report = build_report(
            tmp_path,
            "tiny",
            presets=QUICK,
            checks=["lemma1-cp"],
            threads=1,
            log=lines.append,
            jobs=2,
        )
    assert [p.name for p in report.presets] == [p.name for p in tiny_report.presets]
    # the same runs on the same thread count: the same numbers, in registry order
    assert _measured(report) == _measured(tiny_report)
    assert [p.status for p in report.presets] == [p.status for p in tiny_report.presets]
    assert any(line.startswith("tf-dynamics: ok") for line in lines)  # the jobs' log lines
    assert "2 presets side by side" in (tmp_path / "report.md").read_text(encoding="utf-8")
    for p in QUICK:
        assert f"run {p}" in report.times


def test_jobs_wait_for_a_run_they_can_copy(tmp_path, monkeypatch):
    monkeypatch.setattr("implreg.report.JOB_START", "fork")  # the patches reach the jobs
    # as test_a_configuration_run_twice_is_copied_not_recomputed, two jobs at a time: the
    # htf-dynamics job waits for the trio (whose HTF panel it is) instead of running it too
    from implreg.report import _as_strings

    trio = PRESETS["dynamics-mf-tf-htf"]
    same = ";".join(_as_strings(PRESETS["htf-dynamics"].tiny))
    monkeypatch.setitem(
        PRESETS, "dynamics-mf-tf-htf", dataclasses.replace(trio, tiny={**trio.tiny, "htf": same})
    )
    report = build_report(
        tmp_path,
        "tiny",
        presets=["dynamics-mf-tf-htf", "htf-dynamics", "mf-det-sign"],
        checks=["lemma1-cp"],
        threads=1,
        log=str,
        jobs=2,
    )
    rows = {p.name: p for p in report.presets}
    assert not rows["dynamics-mf-tf-htf"].reused
    assert rows["htf-dynamics"].reused and "copied" in rows["htf-dynamics"].note
    assert rows["mf-det-sign"].status == "ok"


def test_a_job_that_dies_is_a_failed_row(tmp_path, monkeypatch):
    monkeypatch.setattr("implreg.report.JOB_START", "fork")  # the patches reach the jobs
    import os
    import signal

    import implreg.api

    real = implreg.api.run_preset

    def killed(name=None, *args, **kwargs):
        if name == "mf-det-sign":
            os.kill(os.getpid(), signal.SIGKILL)  # the out-of-memory killer, say
        return real(name, *args, **kwargs)

    monkeypatch.setattr(implreg.api, "run_preset", killed)
    report = build_report(
        tmp_path,
        "tiny",
        presets=["tf-dynamics", "mf-det-sign"],
        checks=["lemma1-cp"],
        threads=1,
        log=str,
        jobs=2,
    )
    rows = {p.name: p for p in report.presets}
    assert rows["tf-dynamics"].status == "ok"
    bad = rows["mf-det-sign"]
    assert bad.status == "failed" and "died (exit code -9)" in bad.note
    assert bad.claims and all(c.verdict == NOT_RUN for c in bad.claims)
    assert (tmp_path / "report.html").is_file()


def _waits_for_a_signal(preset, budget, runs, *args):
    """A run that stops at SIGINT / SIGTERM and says so, as run_preset checkpoints."""
    import os
    import time

    from implreg.report import ReportInterrupted
    from implreg.training import Interrupt

    with Interrupt() as stop:
        (runs / f"{preset.name}.started").write_text(str(os.getpid()))
        while not stop.is_set():
            time.sleep(0.01)
        (runs / f"{preset.name}.checkpointed").write_text(str(stop.signum))
    raise ReportInterrupted(f"{preset.name} was interrupted")


def test_a_signal_stops_the_jobs_and_keeps_their_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("implreg.report.JOB_START", "fork")  # the patches reach the jobs
    import os
    import signal
    import threading
    import time

    import implreg.report
    from implreg.report import ReportInterrupted

    monkeypatch.setattr(implreg.report, "_run_one", _waits_for_a_signal)
    monkeypatch.setattr(implreg.report, "_run_threads", lambda *a: 1)  # any two side by side
    runs = tmp_path / "runs"

    def send_when_started() -> None:
        deadline = time.monotonic() + 60
        while len(list(runs.glob("*.started"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_started, daemon=True).start()
    # the two longest start first (FULL_MINUTES: mf-dynamics, mf-det-sign), tf-dynamics waits
    with pytest.raises(ReportInterrupted, match="mf-dynamics, mf-det-sign|mf-det-sign, mf-dyn"):
        build_report(
            tmp_path,
            "tiny",
            presets=["tf-dynamics", "mf-det-sign", "mf-dynamics"],
            checks=["lemma1-cp"],
            log=str,
            jobs=2,
        )
    # both running jobs got the signal and stopped cleanly; the third never started
    assert sorted(p.name for p in runs.glob("*.checkpointed")) == [
        "mf-det-sign.checkpointed",
        "mf-dynamics.checkpointed",
    ]
    assert {p.read_text() for p in runs.glob("*.checkpointed")} == {str(int(signal.SIGTERM))}
    assert not (runs / "tf-dynamics.started").exists()
    assert not (tmp_path / "report.html").exists()


def test_jobs_start_the_longest_first_and_keep_registry_order(tmp_path, monkeypatch):
    monkeypatch.setattr("implreg.report.JOB_START", "fork")
    import implreg.report
    from implreg.report import FULL_MINUTES

    started: list[str] = []

    def quick(preset, budget, runs, *args):
        from implreg.report import PresetRow

        return PresetRow(preset.name, preset.reproduces, status="ok"), None, ""

    monkeypatch.setattr(implreg.report, "_run_one", quick)
    monkeypatch.setattr(implreg.report, "_run_threads", lambda *a: 1)  # the order alone
    names = ["tf-dynamics", "tf-order", "htf-large", "tensor-rank-complexity", "mf-det-sign"]
    report = build_report(tmp_path, "tiny", presets=names, checks=[], log=started.append, jobs=2)
    assert [p.name for p in report.presets] == [n for n in PRESETS if n in names]
    order = [line.split(":")[0] for line in started if line.endswith("jobs running)")]
    assert order == sorted(names, key=lambda n: -FULL_MINUTES[n])
    assert order[0] == "tensor-rank-complexity"
    assert set(FULL_MINUTES) == set(PRESETS)  # every preset has its estimate, no stale name


def test_a_report_killed_outright_stops_its_jobs_gracefully(tmp_path, monkeypatch):
    # kill -9 of the report: each job gets SIGTERM from the OS (PR_SET_PDEATHSIG) and its run
    # checkpoints, so it loses at most one checkpoint interval, as a run of its own would
    import multiprocessing
    import os
    import signal
    import time

    import implreg.report

    monkeypatch.setattr("implreg.report.JOB_START", "fork")
    monkeypatch.setattr(implreg.report, "_run_one", _waits_for_a_signal)
    monkeypatch.setattr(implreg.report, "_run_threads", lambda *a: 1)  # any two side by side
    runs = tmp_path / "runs"

    def report() -> None:
        build_report(
            tmp_path, "tiny", presets=["tf-dynamics", "mf-det-sign"], checks=[], log=str, jobs=2
        )

    proc = multiprocessing.get_context("fork").Process(target=report)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while len(list(runs.glob("*.started"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(list(runs.glob("*.started"))) == 2, "the jobs did not start"
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(list(runs.glob("*.checkpointed"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.join()
        for started in runs.glob("*.started"):  # never leave a job running
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(started.read_text()), signal.SIGKILL)
    assert {p.read_text() for p in runs.glob("*.checkpointed")} == {str(int(signal.SIGTERM))}
    assert len(list(runs.glob("*.checkpointed"))) == 2


def test_jobs_that_would_wait_for_each_other_still_run(tmp_path, monkeypatch):
    # two runs each claiming to make the other's (no preset does): the first goes anyway
    monkeypatch.setattr("implreg.report.JOB_START", "fork")
    import implreg.report
    from implreg.report import PresetRow

    def quick(preset, budget, runs, *args):
        return PresetRow(preset.name, preset.reproduces, status="ok"), None, ""

    cycle = {"tf-dynamics": ("a", {"a", "b"}), "mf-det-sign": ("b", {"a", "b"})}
    monkeypatch.setattr(implreg.report, "_run_one", quick)
    monkeypatch.setattr(implreg.report, "_run_keys", lambda p, budget, data: cycle[p.name])
    names = list(cycle)
    report = build_report(tmp_path, "tiny", presets=names, checks=[], log=str, jobs=2)
    assert sorted(p.name for p in report.presets) == sorted(names)
    assert all(p.status == "ok" for p in report.presets)


def _timed(preset, budget, runs, *args):
    """A run that takes a moment and records when it ran."""
    import time

    from implreg.report import PresetRow

    start = time.monotonic()
    time.sleep(0.3)
    (runs / f"{preset.name}.ran").write_text(f"{start} {time.monotonic()}")
    return PresetRow(preset.name, preset.reproduces, status="ok"), None, ""


def test_jobs_keep_the_threads_in_use_within_the_cores(tmp_path, monkeypatch):
    # a two-thread run beside another on two cores ran 3.2x slower than alone: it waits until
    # it can have both cores, and one-thread runs pair up meanwhile
    monkeypatch.setattr("implreg.report.JOB_START", "fork")
    import implreg.report

    need = {"tensor-rank-complexity": 2, "mf-det-sign": 2, "tf-dynamics": 1, "tf-order": 1}
    need |= {"htf-large": 1, "tf-huber": 1}
    monkeypatch.setattr(implreg.report, "_run_one", _timed)
    monkeypatch.setattr(implreg.report, "_run_threads", lambda p, *a: need[p.name])
    monkeypatch.setattr("implreg.threads.available_cores", lambda: 2)
    lines: list[str] = []
    report = build_report(tmp_path, "tiny", presets=list(need), checks=[], log=lines.append, jobs=2)
    assert all(p.status == "ok" for p in report.presets)
    ran = {
        n: [float(t) for t in (tmp_path / "runs" / f"{n}.ran").read_text().split()] for n in need
    }
    for n, (a, b) in ran.items():
        for m, (c, d) in ran.items():
            if m != n and a < d and c < b:  # n and m ran at the same time
                assert need[n] + need[m] <= 2, f"{n} and {m} ran side by side"
    started = {line.split(":")[0]: line for line in lines if line.endswith("jobs running)")}
    assert started["tensor-rank-complexity"].endswith("(1 of 2 jobs running)")  # the longest
    pairs = [n for n in need if need[n] == 1 and started[n].endswith("(2 of 2 jobs running)")]
    assert pairs, "no two one-thread runs went side by side"
    # more jobs than cores: the threads of --jobs 3 may run at once (the user asked for them)
    lines.clear()
    build_report(
        tmp_path / "three", "tiny", presets=list(need), checks=[], log=lines.append, jobs=3
    )
    assert any(line.endswith("(3 of 3 jobs running)") for line in lines)
